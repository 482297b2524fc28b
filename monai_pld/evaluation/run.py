"""One evaluation run: classifiers of several backbones trained on an image set and tested on the real test split,
with the results written as they come (``results.json``) and summarised (``summary.md``, ``accuracy.png``, MLflow).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_pld import distributed
from monai_pld.data import ImageSet, ImageSource
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import atomic_save_json, atomic_write, derive_seed, format_duration

from .metrics import summarise
from .report import bar_chart, log_evaluation, summary_markdown
from .training import train_and_test

__all__ = ["evaluate_image_set"]

logger = logging.getLogger("monai_pld")


def evaluate_image_set(
    source: ImageSource,
    train: ImageSet,
    test: ImageSet,
    output_dir: str | os.PathLike,
    backbones: Sequence[str] = ("convnet", "alexnet", "vgg11", "resnet18", "vit"),
    runs: int = 2,
    epochs: int = 300,
    protocol: str = "dc",
    seed: int = 0,
    device: str | torch.device = "auto",
    header: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
    run_name: str = "evaluation",
    dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
) -> dict[str, Any]:
    """Train ``runs`` classifiers of every backbone on ``source``, test them on ``test``, write the results.

    Writes ``results.json`` (every run, written after each so a crash keeps finished runs), ``summary.md`` and
    ``accuracy.png`` under ``output_dir``, and, with ``tracking_uri``, an MLflow run with per-backbone metrics and
    those files as artefacts.

    Returns:
        ``{"runs": [...], "summary": {...}}``.
    """
    if runs < 1 or epochs < 1 or not backbones:
        raise ValueError(f"need runs >= 1, epochs >= 1 and at least one backbone; got {runs}, {epochs}, {backbones}")
    for name in backbones:  # fail on an unknown or unsuitable backbone before training anything
        get_classifier(name, test.channels, test.num_classes, test.image_size)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = train.normalization()
    header = {
        "protocol": protocol,
        "epochs": epochs,
        "runs": runs,
        "backbones": list(backbones),
        "test_images": len(test),
        **(header or {}),
    }
    header.setdefault("distilled", source.description.get("path", source.description.get("kind")))
    header.setdefault("mode", source.description.get("mode", "fixed"))
    header.setdefault("test_split", "test")
    header.setdefault("dataset_flag", train.name)
    results: list[dict[str, Any]] = []
    # under torchrun every rank trains its share of the (backbone, run) pairs; rank 0 gathers and writes
    pairs = distributed.shard([(backbone, run) for backbone in backbones for run in range(runs)])
    total, start = len(pairs), time.perf_counter()
    progress = out / ("results.json" if distributed.is_main() else f"results.rank{distributed.rank()}.json")
    for backbone, run in pairs:
        metrics = train_and_test(
            backbone,
            source,
            test,
            mean,
            std,
            protocol=protocol,
            epochs=epochs,
            dsa_strategy=dsa_strategy,
            seed=derive_seed(seed, run),
            device=device,
        )
        results.append({"backbone": backbone, "run": run, **metrics})
        done = len(results)
        eta = (time.perf_counter() - start) / done * (total - done)
        logger.info(
            f"{distributed.rank_note()}evaluation {done}/{total}: {backbone} run {run + 1}/{runs} accuracy "
            f"{100 * metrics['accuracy']:.2f}% AUC {metrics['auc']:.3f} F1 {metrics['f1']:.3f} | "
            f"{metrics['train_seconds']:.1f} s | ETA {format_duration(eta)}"
        )
        atomic_save_json({"header": header, "source": source.description, "runs": results}, progress)
    if distributed.world_size() > 1:
        order = {(b, r): k for k, (b, r) in enumerate((b, r) for b in backbones for r in range(runs))}
        results = sorted(
            (row for part in distributed.gather(results) for row in part),
            key=lambda row: order[row["backbone"], row["run"]],
        )
        if not distributed.is_main():
            progress.unlink(missing_ok=True)  # rank 0 writes them all
            return {"runs": results, "summary": summarise(results)}
        header["ranks"] = distributed.world_size()
    summary = summarise(results)
    atomic_save_json(
        {"header": header, "source": source.description, "runs": results, "summary": summary}, out / "results.json"
    )
    atomic_write(out / "summary.md", lambda f: f.write(summary_markdown(summary, header).encode()))
    bar_chart(summary, out / "accuracy.png", f"{header['distilled']} ({protocol}, {epochs} epochs)")
    if tracking_uri:
        log_evaluation(tracking_uri, experiment_name, run_name, header, summary, out)
    return {"runs": results, "summary": summary}
