"""Decode image files once, in DataLoader workers, into a uint8 array cached as an npz keyed by a fingerprint.

Shared by the ImageNet subsets and a site's own data: both read thousands of image files that take minutes to
decode on a CPU, and both must reuse the decoded array until the files change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from monai_pld.utils import atomic_savez

__all__ = ["cache_folder", "decode_into", "fingerprint", "load_or_build"]

logger = logging.getLogger("monai_pld")


def cache_folder(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` when given, else ``<root>/.monai_pld_cache`` when writable, else ``~/.cache/monai_pld``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    preferred = root / ".monai_pld_cache"
    try:
        preferred.mkdir(exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return Path("~/.cache/monai_pld").expanduser()


def fingerprint(lines: Iterable[str]) -> str:
    """16 hex digits of the SHA-256 of ``lines`` (file names, sizes, mtimes, options) joined by newlines."""
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:16]


class _Items(torch.utils.data.Dataset):
    """``read(i)`` for ``i < n``, as a map-style dataset (module level, so workers can unpickle it)."""

    def __init__(self, n: int, read: Callable[[int], object]) -> None:
        self.n, self.read = n, read

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, object]:
        return i, self.read(i)


def _as_list(batch: list) -> list:
    return batch


def decode_into(
    n: int,
    read: Callable[[int], object],
    num_workers: int,
    what: str = "images",
    batch_size: int = 64,
) -> Iterator[tuple[int, object]]:
    """Run ``read(i)`` for every ``i < n`` in a torch DataLoader with ``num_workers`` processes and yield
    ``(i, result)`` in order, logging progress (count and rate) every ~10 %."""
    loader = torch.utils.data.DataLoader(
        _Items(n, read), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    start, done, step = time.perf_counter(), 0, max(batch_size, n // 10)
    for batch in loader:
        yield from batch
        before, done = done, done + len(batch)
        if done // step > before // step or done == n:
            rate = done / max(time.perf_counter() - start, 1e-9)
            logger.info(f"decoded {done}/{n} {what} ({rate:.0f}/s)")


def load_or_build(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of the npz at ``path``, building and writing it (atomically) first when it is missing.

    Older caches of the same source (files named ``<prefix>_*.npz`` with ``path``'s prefix, the name up to the
    fingerprint) are removed after a rebuild so a changing folder does not fill the disk.
    """
    if path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(path, **arrays)
    prefix = path.name.rsplit("_", 1)[0]
    for old in path.parent.glob(f"{prefix}_*.npz"):
        if old != path and len(old.name) == len(path.name):
            old.unlink(missing_ok=True)
    return arrays
