"""Splits of a site's own images: what a source lists, the seeded stratified val/test hold-out and the split file
that keeps the same images held out on every run (shared by the npz and the image-file sources)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monai_pld.utils import atomic_save_json

from .cache import cache_folder, fingerprint

__all__ = ["Source", "assign_splits", "check_classes", "split_file", "stratified_holdout"]

logger = logging.getLogger("monai_pld")


@dataclass
class Source:
    """What a source lists: a key per image (relative path, or ``<split>:<index>`` in an npz), its label, the split
    the source puts it in (or None), and the class names."""

    keys: list[str]
    labels: np.ndarray
    splits: list[str | None]
    class_names: list[str]


def stratified_holdout(
    keys: list[str], labels: np.ndarray, fractions: dict[str, float], seed: int
) -> dict[str, list[str]]:
    """Per class, a seeded shuffle; the first ``round(n * fraction)`` go to each held-out split, at least one image
    of every class staying in train."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {name: [] for name in fractions}
    for c in np.unique(labels):
        index = np.flatnonzero(labels == c)
        index = index[rng.permutation(len(index))]
        start = 0
        for name, fraction in fractions.items():
            take = min(int(round(len(index) * fraction)), max(len(index) - 1 - start, 0))
            out[name] += [keys[i] for i in index[start : start + take]]
            start += take
    return {name: sorted(v) for name, v in out.items()}


def assign_splits(source: Source, opts: dict[str, Any], path: Path) -> np.ndarray:
    """The split of every image: the source's own, with missing held-out splits carved out of train through the
    split file (read when it exists and matches the seed and fractions, else written)."""
    splits = np.array([s or "train" for s in source.splits], dtype=object)
    missing = [s for s in ("val", "test") if not np.any(splits == s)]
    fractions = {s: float(opts[f"{s}_fraction"]) for s in missing if opts[f"{s}_fraction"] > 0}
    if not fractions:
        return splits
    wanted = {"split_seed": opts["split_seed"], "fractions": fractions}
    held: dict[str, list[str]] | None = None
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if {k: record.get(k) for k in wanted} == wanted:
                held = {s: list(record["heldout"][s]) for s in fractions}
            else:
                logger.warning(
                    f"split file {path} was made with {record.get('fractions')}, not {fractions}: replacing it, "
                    "so other images are held out than before (runs distilled before this one saw different ones)"
                )
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning(f"split file {path} is unreadable ({e}); writing a new one")
    train = np.flatnonzero(splits == "train")
    train_keys = [source.keys[i] for i in train]
    if held is None:
        held = stratified_holdout(train_keys, source.labels[train], fractions, opts["split_seed"])
        atomic_save_json({**wanted, "source_images": len(train_keys), "heldout": held}, path)
        logger.info(f"held out {', '.join(f'{len(v)} {s}' for s, v in held.items())} images; split file {path}")
    else:
        known = set(train_keys)
        gone = sum(k not in known for v in held.values() for k in v)
        if gone:
            logger.warning(f"{gone} held-out images of the split file {path} are no longer in the source")
    position = {k: i for i, k in zip(train, train_keys, strict=True)}
    for name, names in held.items():
        for key in names:
            if key in position:
                splits[position[key]] = name
    return splits


def check_classes(train_labels: np.ndarray, names: list[str], where: str, remedy: str | None = None) -> None:
    """Raise ``ValueError`` naming every class without training images, or when there are fewer than two;
    ``remedy``: what to do about an empty class (default: add images of it, or remove it from the labels)."""
    if len(names) < 2:
        raise ValueError(
            f"{where}: the labels name {len(names)} class(es) ({names}); distillation makes a set for training a "
            "classifier, which needs at least two classes: check the label column or folder layout"
        )
    counts = np.bincount(train_labels, minlength=len(names))
    empty = [f"{c} ({names[c]})" for c in np.flatnonzero(counts == 0)]
    if empty:
        lowest = int(np.flatnonzero(counts)[0]) if counts.any() else 0
        hint = (
            f" The labels start at {lowest}: classes are numbered from 0, so if there is no class 0, subtract "
            f"{lowest} from every label (e.g. 1..K becomes 0..K-1)."
            if lowest > 0 and all(counts[:lowest] == 0)
            else ""
        )
        remedy = remedy or "add images of it, or remove the class from the labels"
        raise ValueError(
            f"{where}: class {', '.join(empty)} has no training images; every class needs training images to be "
            f"distilled: {remedy}.{hint}"
        )


def split_file(source: Path, opts: dict[str, Any]) -> Path:
    """Where the split file of ``source`` lives: in its cache folder, named by the source and the split seed."""
    folder = cache_folder(source.parent if source.is_file() else source, opts["cache_dir"])
    tag = fingerprint([str(source.resolve())])[:8]
    return folder / f"{source.stem}_{tag}_split_seed{opts['split_seed']}.json"
