"""Images/s of the whole generation pipeline and of each stage (stage 1 GPT, stage-2 decoder, VQ decode).

Random-weight pieces built in memory at the sizes of a preset (speed does not depend on the weights, and sampling
always runs every position). Three paths: DiGIT with an AR decoder, DiGIT with a MaskGIT decoder, LlamaGen (the GPT
samples VQ tokens that are decoded directly).

    python benchmarks/generate.py --preset tiny --n 32 --batch-size 8
    python benchmarks/generate.py --preset small --n 16 --batch-size 8 --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's ``tokenize`` (imported by ``inspect``) when this file is
# run as a script, because Python puts the script's directory first on sys.path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from digit.models.gpt import GPT  # noqa: E402
from digit.models.presets import build_config  # noqa: E402
from digit.pipeline import Pipeline, generate_images  # noqa: E402
from digit.sampling.params import SamplingParams  # noqa: E402
from digit.tokenizers.vq import VQModel  # noqa: E402

# preset -> (stage-1 GPT preset, stage-1 grid, stage-1 vocab, VQ overrides of the "tiny" VQ preset)
SIZES = {
    # 32 px: 4x4 discriminative tokens, 8x8 VQ tokens
    "tiny": ("tiny", (4, 4), 64, {"image_size": 32}),
    # 64 px: 16x16 discriminative tokens (K=1024), 16x16 VQ tokens (K=1024), GPT dim 256 x 4 layers
    "small": ("small", (16, 16), 1024, {"image_size": 64, "codebook_size": 1024}),
}


def build(preset: str, kind: str, device: torch.device) -> Pipeline:
    gpt_preset, grid, vocab, vq_over = SIZES[preset]
    torch.manual_seed(0)
    vq = VQModel.from_preset("tiny", **vq_over).to(device).eval()
    if kind == "llamagen":
        s1 = build_config(gpt_preset, vocab_size=vq.vocab_size, grid=vq.grid_size, cond="class", num_classes=10)
        return Pipeline(GPT(s1).to(device).eval(), {"model": s1.to_dict()}, vq, kind="llamagen")
    s1 = build_config(gpt_preset, vocab_size=vocab, grid=grid, cond="class", num_classes=10)
    dec = build_config(
        gpt_preset, vocab_size=vq.vocab_size, grid=vq.grid_size, cond="prefix", prefix_vocab_size=vocab,
        prefix_grid=grid, causal=kind == "digit-ar",
    )  # fmt: skip
    return Pipeline(
        GPT(s1).to(device).eval(),
        {"model": s1.to_dict()},
        vq,
        GPT(dec).to(device).eval(),
        {"model": dec.to_dict()},
        kind,
    )


def bench(pipe: Pipeline, n: int, batch_size: int) -> dict[str, float]:
    labels = torch.arange(n).remainder(10).numpy()
    generate_images(pipe, labels[:batch_size], SamplingParams(top_k=100), batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    res = generate_images(pipe, labels, SamplingParams(top_k=100), batch_size=batch_size, seed=1)
    wall = time.perf_counter() - t0
    out = {"images_per_s": n / wall}
    for stage, s in res.seconds.items():
        if stage != "stage2" or pipe.decoder is not None:
            out[f"{stage}_images_per_s"] = n / s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(SIZES), default="tiny")
    ap.add_argument("--kinds", nargs="+", default=["digit-ar", "digit-nar", "llamagen"])
    ap.add_argument("--n", type=int, default=32, help="images per measurement")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"preset {args.preset}, {args.n} images, batch {args.batch_size}, {device} ({where}), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows = {}
    for kind in args.kinds:
        with torch.inference_mode():
            r = bench(build(args.preset, kind, device), args.n, args.batch_size)
        rows[kind] = r
        stages = "  ".join(f"{k.removesuffix('_images_per_s')} {v:8.2f}" for k, v in r.items() if k != "images_per_s")
        print(f"{kind:10s} total {r['images_per_s']:8.2f} img/s   per stage (img/s): {stages}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "n": args.n, "batch_size": args.batch_size, "device": str(device),
                       "results": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
