"""Torch datasets over image sources. Items that fail to decode come through as ``image=None`` with the reason, so a
collate function drops them and the caller counts and reports them once at the end (or stops, with ``--strict``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from digit.data.decode import BadImage, decode_image
from digit.data.sources import ImageSource
from digit.data.transforms import item_rng, preprocess
from digit.errors import DigitError
from digit.utils.distributed import get_dist_info

Item = tuple[torch.Tensor | None, int, int, str | None]  # (uint8 [3,S,S] or None, label, index, error)


def load_item(
    source: ImageSource, index: int, data: bytes, image_size: int, train: bool, seed: int, epoch: int
) -> Item:
    label = source.entries[index].label
    try:
        img = decode_image(data)
    except BadImage as e:
        return None, label, index, str(e)
    rng = item_rng(seed, epoch, index) if train else None
    return preprocess(img, image_size, train=train, rng=rng), label, index, None


class ImageDataset(Dataset):
    """Map-style: item i -> (image, label, index, error). ``train`` = random crop + flip, seeded per (seed, epoch, i)."""

    def __init__(self, source: ImageSource, image_size: int, *, train: bool = False, seed: int = 0):
        self.source, self.image_size, self.train, self.seed, self.epoch = source, image_size, train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Item:
        try:
            data = self.source.read_bytes(index)
        except OSError as e:
            return None, self.source.entries[index].label, index, f"unreadable ({e})"
        return load_item(self.source, index, data, self.image_size, self.train, self.seed, self.epoch)


def spread_indices(total: int, n: int | None) -> list[int]:
    """``n`` of ``total`` indices spread evenly (``k * total // n``): what ``--limit N`` takes. A source listed class
    by class keeps every class in proportion (the first N would be one class), and the same N gives the same images."""
    if n is None or n >= total:
        return list(range(total))
    return [k * total // n for k in range(n)]


class StreamingImageDataset(IterableDataset):
    """Reads the source in storage order (one pass over a .tar.gz), each worker of each rank taking its own share.

    Across all ranks and workers every index appears exactly once; outputs carry their index, so order is irrelevant.
    """

    def __init__(
        self,
        source: ImageSource,
        image_size: int,
        *,
        train: bool = False,
        seed: int = 0,
        limit: int | None = None,
        shard_by_rank: bool = True,
    ):
        self.source, self.image_size, self.train, self.seed, self.epoch = source, image_size, train, seed, 0
        # ``limit``: that many images spread over the source (`spread_indices`), by position among the picked ones
        picked = spread_indices(len(source), limit)
        self.limit = len(picked)
        self.position = None if self.limit == len(source) else {i: k for k, i in enumerate(picked)}
        # read the rank here, in the launching process: spawned/forkserver DataLoader workers have no process group
        d = get_dist_info()
        self.rank, self.world = (d.rank, d.world_size) if shard_by_rank else (0, 1)

    def __len__(self) -> int:
        return self.limit

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        shard, total = self.rank * nw + wid, self.world * nw
        position = self.position

        def select(i: int) -> bool:
            k = i if position is None else position.get(i)
            return k is not None and k % total == shard

        for i, data in self.source.iter_bytes(select):
            if isinstance(data, OSError):
                yield None, self.source.entries[i].label, i, f"unreadable ({data})"
            else:
                yield load_item(self.source, i, data, self.image_size, self.train, self.seed, self.epoch)


def collate_skip(batch: list[Item]) -> dict:
    good = [b for b in batch if b[0] is not None]
    failures = [(b[2], b[3]) for b in batch if b[0] is None]
    if good:
        images = torch.stack([b[0] for b in good])
    else:
        images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return {
        "images": images,
        "labels": torch.tensor([b[1] for b in good], dtype=torch.long),
        "indices": torch.tensor([b[2] for b in good], dtype=torch.long),
        "failures": failures,
    }


def image_loader(dataset: Dataset, batch_size: int, workers: int = 0, **kwargs) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skip,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )


def require_usable_image(source: ImageSource, limit: int | None = None) -> None:
    """Decode entries in storage order until one is a usable image; if none is, the standard zero-usable error.

    For trainers, which must refuse before writing a run: normally costs one decode; all of them only when all fail."""
    report = SkipReport(source)
    picked = set(spread_indices(len(source), limit))
    for i, data in source.iter_bytes(picked.__contains__):
        if isinstance(data, OSError):
            report.add([(i, f"unreadable ({data})")])
            continue
        try:
            decode_image(data)
            return
        except BadImage as e:
            report.add([(i, str(e))])
    report.require_usable(0)


@dataclass
class SkipReport:
    """Counts the files a run skipped; reports them once at the end. With ``strict`` the first one is an error."""

    source: ImageSource
    strict: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._keys = {k for k, _ in self.skipped}
        for key in self.source.loose_files:
            self.add_key(key, "outside any class folder")
        for key, reason in self.source.rejected:
            self.add_key(key, reason)

    def add_key(self, key: str, reason: str) -> None:
        if self.strict:
            raise DigitError(f"{self.source.path}: {key}: {reason}")
        if key not in self._keys:  # a file that fails every epoch is one skipped file
            self._keys.add(key)
            self.skipped.append((key, reason))

    def add(self, failures: list[tuple[int, str]]) -> None:
        for index, reason in failures:
            self.add_key(self.source.entries[index].key, reason)

    def __len__(self) -> int:
        return len(self.skipped)

    def require_usable(self, n_usable: int) -> None:
        """The one refusal of a run left with no image to work on (called before anything is written)."""
        if n_usable <= 0:
            raise DigitError(f"no usable images in {self.source.path}: {self.summary()}")

    def summary(self, max_listed: int = 5) -> str:
        if not self.skipped:
            return "skipped 0 files"
        listed = "; ".join(f"{k}: {r}" for k, r in self.skipped[:max_listed])
        more = f" (+{len(self.skipped) - max_listed} more)" if len(self.skipped) > max_listed else ""
        return f"skipped {len(self.skipped)} file(s): {listed}{more}"

    def to_json(self) -> dict:
        return {"n_skipped": len(self.skipped), "skipped": [{"file": k, "reason": r} for k, r in self.skipped[:1000]]}
