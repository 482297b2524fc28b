"""Classification metrics of one trained classifier (scikit-learn), and their summary over runs and backbones."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "summarise"]


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro one-vs-rest AUC, macro F1 and per-class accuracy (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

    predictions = probabilities.argmax(1)
    present = np.unique(labels)
    try:
        if num_classes == 2:
            auc = float(roc_auc_score(labels, probabilities[:, 1]))
        elif len(present) == num_classes:
            auc = float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
        else:  # classes missing from the test labels: score the present ones, renormalised as sklearn requires
            scores = probabilities[:, present] / probabilities[:, present].sum(1, keepdims=True)
            auc = float(roc_auc_score(labels, scores, multi_class="ovr", average="macro", labels=present))
    except ValueError:  # a single class in the test labels: AUC is undefined
        auc = float("nan")
    per_class = recall_score(labels, predictions, labels=list(range(num_classes)), average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "auc": auc,
        "f1": float(f1_score(labels, predictions, labels=list(range(num_classes)), average="macro", zero_division=0)),
        "per_class_accuracy": [float(v) for v in per_class],
    }


def summarise(results: list[dict[str, Any]], distil_backbone: str = "convnet") -> dict[str, Any]:
    """Mean and std per backbone, and the cross-architecture average over the backbones other than the one used
    to distil."""
    per: dict[str, dict[str, Any]] = {}
    for backbone in dict.fromkeys(r["backbone"] for r in results):
        runs = [r for r in results if r["backbone"] == backbone]
        entry: dict[str, Any] = {"runs": len(runs)}
        for key in ("accuracy", "auc", "f1", "train_seconds"):
            values = [r[key] for r in runs if not (isinstance(r[key], float) and math.isnan(r[key]))]
            entry[key] = statistics.fmean(values) if values else float("nan")
            entry[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        per[backbone] = entry
    cross = [v["accuracy"] for k, v in per.items() if k != distil_backbone]
    return {
        "per_backbone": per,
        "cross_architecture_accuracy": statistics.fmean(cross) if cross else None,
        "distil_backbone": distil_backbone,
    }
