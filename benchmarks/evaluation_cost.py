"""Seconds per evaluation run of every backbone, and the wall time of the default ``evaluate.yaml``.

Run: python benchmarks/evaluation_cost.py [--epochs 20] [--rounds 2] [--threads 2] [--bundle] [--cpu-allocator default]

Times ``train_and_test`` (the function every evaluation run calls) for each backbone on an image set of the default
PathMNIST bundle's shape: 9 classes x IPC 10 = 90 images, 28 px RGB, tested on 7,180 images (the size of the
PathMNIST test split). Pixel values are random: the cost does not depend on them. Backbones are interleaved round
by round so that machine noise hits them alike. Each run trains ``--epochs`` epochs; its time is split into training
seconds per epoch (the trainer's own clock) and the rest (network build and the test pass, independent of the
epochs); the last column extrapolates to the default 300 epochs.

With ``--bundle`` it also runs the default ``bundles/pathmnist/evaluate.yaml`` (300 epochs, 5 backbones, 1 run,
DC protocol) on that data through ``python -m monai.bundle`` and reports its wall time. ``--cpu-allocator`` is the
bundles' ``cpu_allocator`` for this process (``tuned``, as the evaluation bundle sets it, or ``default``); compare the
two in separate processes, since the setting cannot be undone within one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_pld.data import ImageSet
from monai_pld.evaluation import ImageSource, train_and_test
from monai_pld.utils import CPU_ALLOCATORS, configure_cpu_allocator

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("convnet", "alexnet", "vgg11", "resnet18", "vit")


def fake_pathmnist(folder: Path, test_images: int = 7180, seed: int = 0) -> Path:
    """A ``pathmnist.npz`` with PathMNIST's test split size and a small train/val split (only the test set and the
    90 distilled images are used by an evaluation run)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 900), ("val", 90), ("test", test_images)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 9).astype(np.uint8)[:, None]
    path = folder / "pathmnist.npz"
    np.savez(path, **arrays)
    return path


def time_backbones(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(9).repeat_interleave(10)
    source = ImageSource(torch.rand(90, 3, 28, 28, generator=gen), labels, {"kind": "benchmark"})
    test = ImageSet(
        torch.randint(0, 256, (7180, 3, 28, 28), dtype=torch.uint8, generator=gen),
        torch.arange(7180) % 9,
        [str(c) for c in range(9)],
        "pathmnist",
    )
    mean, std = [0.5] * 3, [0.25] * 3
    times: dict[str, dict[str, list[float]]] = {b: {"train": [], "fixed": []} for b in args.backbones}
    for _ in range(args.rounds):
        for backbone in args.backbones:
            start = time.perf_counter()
            result = train_and_test(backbone, source, test, mean, std, epochs=args.epochs, device="cpu")
            total = time.perf_counter() - start
            times[backbone]["train"].append(result["train_seconds"] / args.epochs)
            times[backbone]["fixed"].append(total - result["train_seconds"])
    out = {}
    for backbone, t in times.items():
        per_epoch, fixed = statistics.median(t["train"]), statistics.median(t["fixed"])
        out[backbone] = {"per_epoch": per_epoch, "fixed": fixed, "run_300": fixed + 300 * per_epoch}
    return out


def time_bundle(folder: Path) -> float:
    images = np.random.default_rng(1).integers(0, 256, (90, 28, 28, 3), dtype=np.uint8)
    np.savez(folder / "images.npz", images=images, labels=np.repeat(np.arange(9), 10).astype(np.int64))
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/pathmnist/evaluate.yaml",
        "--dataset_dir",
        str(folder),
        "--download",
        "false",
        "--distilled",
        str(folder / "images.npz"),
        "--output_dir",
        str(folder / "evaluation"),
        "--tracking_uri",
        f"sqlite:///{folder / 'mlruns.db'}",
    ]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--epochs", type=int, default=20, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bundle", action="store_true", help="also time the default evaluate.yaml end to end")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="tuned")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = configure_cpu_allocator(args.cpu_allocator)
    print(
        f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({args.threads} threads, allocator {'tuned' if tuned else 'untouched'}); 90 images 28 px RGB, 9 classes, "
        "test 7,180 images; DC protocol, batch 256\n"
    )
    print("| backbone | train s/epoch | build + test s | s per 300-epoch run |\n| --- | --- | --- | --- |")
    for backbone, t in time_backbones(args).items():
        print(f"| {backbone} | {t['per_epoch']:.3f} | {t['fixed']:.1f} | {t['run_300']:.0f} |", flush=True)
    if args.bundle:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            fake_pathmnist(folder)
            seconds = time_bundle(folder)
        print(f"\ndefault bundles/pathmnist/evaluate.yaml (300 epochs x 5 backbones x 1 run): {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
