"""What an evaluation writes besides ``results.json``: ``summary.md``, ``accuracy.png`` and an MLflow run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from monai_pld.utils import atomic_write, mlflow_run

__all__ = ["bar_chart", "log_evaluation", "summary_markdown"]


def summary_markdown(summary: dict[str, Any], header: dict[str, Any]) -> str:
    """``summary.md``: the table of every backbone's mean and std, and the cross-architecture accuracy."""
    lines = [
        f"# Evaluation of {header['distilled']}",
        "",
        f"Protocol `{header['protocol']}`, {header['epochs']} epochs, {header['runs']} run(s) per backbone, "
        f"mode `{header['mode']}`, tested on the real `{header['test_split']}` split of `{header['dataset_flag']}` "
        f"({header['test_images']} images).",
        "",
        "| backbone | accuracy (%) | macro AUC | macro F1 | train s/run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in summary["per_backbone"].items():
        lines.append(
            f"| {name} | {100 * v['accuracy']:.2f} ± {100 * v['accuracy_std']:.2f} | {v['auc']:.3f} ± "
            f"{v['auc_std']:.3f} | {v['f1']:.3f} ± {v['f1_std']:.3f} | {v['train_seconds']:.1f} |"
        )
    cross = summary["cross_architecture_accuracy"]
    if cross is not None:
        lines += [
            "",
            f"Cross-architecture accuracy (mean over the backbones other than "
            f"`{summary['distil_backbone']}`): {100 * cross:.2f} %",
        ]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], path: Path, title: str) -> None:
    """``accuracy.png``: the mean test accuracy of every backbone with its std as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    names = list(summary["per_backbone"])
    means = [100 * summary["per_backbone"][n]["accuracy"] for n in names]
    stds = [100 * summary["per_backbone"][n]["accuracy_std"] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4C72B0")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def log_evaluation(uri: str, experiment: str, run_name: str, header: dict, summary: dict, out: Path) -> None:
    """One MLflow run with the header as params, per-backbone metrics and the written files as artefacts."""
    with mlflow_run(uri, experiment, run_name, header) as (client, run_id):
        for name, values in summary["per_backbone"].items():
            for key in ("accuracy", "accuracy_std", "auc", "f1", "train_seconds"):
                if not math.isnan(values[key]):
                    client.log_metric(run_id, f"{name}_{key}", float(values[key]))
        if summary["cross_architecture_accuracy"] is not None:
            client.log_metric(run_id, "cross_architecture_accuracy", float(summary["cross_architecture_accuracy"]))
        for name in ("results.json", "summary.md", "accuracy.png"):
            client.log_artifact(run_id, str(out / name), artifact_path="evaluation")
