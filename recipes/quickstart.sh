#!/usr/bin/env bash
# The main job, end to end on a CPU in minutes, offline: synthetic shapes -> a DINO-trained ViT -> a K-means
# (discriminative) tokenizer -> a VQ tokenizer -> a class-conditional stage-1 GPT on discriminative tokens -> a stage-2
# decoder (discriminative -> VQ tokens) -> labelled samples (grid.png), plus the token stability of both tokenizers.
#
#   PATH=$PWD/.venv/bin:$PATH bash recipes/quickstart.sh [OUT_DIR]      (default outputs/quickstart)
#
# Sizes are CPU-demo sizes; see recipes/*.md and the README for the real ones.
set -euo pipefail
OUT=${1:-outputs/quickstart}
DATA=$OUT/shapes
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/9 data: 10 classes x 60 synthetic 32x32 images"
python -m digit.data.synthetic --out "$DATA" --classes 10 --per-class 60 --size 32 --seed 0

step "2/9 self-supervised encoder (DINO, ViT-tiny shape, patch 4 -> 8x8 grid)"
digit encoder pretrain --data "$DATA" --encoder vit_tiny_patch16_224 \
  --encoder-kwargs '{"patch_size": 4, "depth": 4}' --image-size 32 --local-size 16 --local-crops 2 \
  --epochs 4 --batch-size 60 --out-dim 1024 --momentum-teacher 0.9 --val-fraction 0.1 --seed 0 --out "$OUT/encoder"

step "3/9 discriminative tokenizer: K-means (K=64) on features after block L-1"
digit tokenizer fit --data "$DATA" --encoder "$OUT/encoder" --layer 1 --clusters 64 --sample-frac 0.5 \
  --seed 0 --out "$OUT/tokenizer"
digit tokenize --tokenizer "$OUT/tokenizer" --data "$DATA" --flip --out "$OUT/tokens"

step "4/9 VQ tokenizer (tiny preset, 8x8 codes)"
digit vq train --data "$DATA" --preset tiny --steps 300 --batch-size 32 --lr 1e-3 --disc-weight 0 --seed 0 \
  --out "$OUT/vq"
digit tokenize --tokenizer "$OUT/vq" --data "$DATA" --flip --out "$OUT/vq-tokens"

step "5/9 stage 1: class-conditional GPT on discriminative tokens"
digit train --tokens "$OUT/tokens" --model tiny --class-cond --steps 300 --batch-size 32 --lr 1e-3 \
  --seed 0 --out "$OUT/stage1"

step "6/9 stage 2: AR decoder, discriminative tokens (prefix) -> VQ tokens"
digit train --tokens "$OUT/vq-tokens" --prefix-tokens "$OUT/tokens" --model tiny --steps 300 --batch-size 32 \
  --lr 1e-3 --seed 0 --out "$OUT/stage2"

step "7/9 generate: class label -> PNGs"
digit generate --stage1 "$OUT/stage1" --decoder "$OUT/stage2" --vq "$OUT/vq" -n 40 --cfg-scale 2.0 --top-k 32 \
  --seed 0 --out "$OUT/samples"

step "8/9 token stability under pixel noise, both tokenizers"
digit stability --tokenizer "$OUT/tokenizer" --data "$DATA" --snr 30 20 10 --limit 200 --out "$OUT/stability-discriminative.json"
digit stability --tokenizer "$OUT/vq" --data "$DATA" --snr 30 20 10 --limit 200 --out "$OUT/stability-vq.json"

step "9/9 done"
echo "samples: $OUT/samples/grid.png   runs: $OUT/{encoder,tokenizer,vq,stage1,stage2}"
