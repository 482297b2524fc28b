"""Seconds per iteration and peak memory of every matcher x parameterisation (DM, DC, MTT x slfd, latent, pixel).

Run: python benchmarks/matrix_cost.py [--sizes 28 32] [--ipc 10] [--iters 3] [--rounds 2] [--dc-loops glad]

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) belongs to that cell
alone; the table reports it together with the growth over the memory held just before the first iteration (the
part that the matching itself needs). Cells of one matcher are interleaved round by round so that machine noise
affects ``slfd`` and ``latent`` alike, and the ``slfd / latent`` ratio is computed from those side-by-side medians.

Data are random images of the shape of PathMNIST (28 px, 9 classes) or CIFAR-10 (32 px, 10 classes); the generator
is an untrained AutoencoderKL of the default size and the MTT experts are trained for 2 epochs on the same random
data (costs do not depend on pixel values or weights). DC uses ``--dc-loops`` (``glad`` = 1 outer / 1 inner step;
``reference`` = 10/50 at IPC 10, whose iterations alternate matching with 50 inner epochs: the median then
reflects the inner training, reported separately as it dominates).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SHAPES = {28: (3, 9), 32: (3, 10)}  # image size -> (channels, classes): PathMNIST-like, CIFAR-10-like
MATCHERS = ("dm", "dc", "mtt")
PARAMETERIZATIONS = ("slfd", "latent", "pixel")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_cell(args: argparse.Namespace) -> dict:
    """One cell in this process: build everything, run warm-up + timed iterations, report timings and memory."""
    from ignite.engine import Events

    from monai_pld.data import ImageSet
    from monai_pld.networks.generators import AutoencoderKLGenerator, PixelGenerator, default_autoencoder_config
    from monai_pld.workflows import build_trainer

    torch.set_num_threads(args.threads)
    channels, classes = SHAPES[args.size]
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (classes * args.per_class, channels, args.size, args.size), dtype=torch.uint8, generator=gen
    )
    data = ImageSet(images, torch.arange(classes).repeat_interleave(args.per_class), [str(c) for c in range(classes)])
    torch.manual_seed(0)
    if args.parameterization == "pixel":
        generator = PixelGenerator((channels, args.size, args.size)).freeze()
    else:
        generator = AutoencoderKLGenerator(**default_autoencoder_config(args.size, channels)).freeze()
    matcher_kwargs: dict = {}
    if args.matcher == "dc":
        matcher_kwargs = {"loops": args.dc_loops}
    elif args.matcher == "mtt":
        matcher_kwargs = {
            "expert_dir": args.expert_dir,
            "syn_steps": args.syn_steps,
            "expert_epochs": 1,
            "max_start_epoch": 1,
        }
    total = args.warmup + args.iters
    trainer = build_trainer(
        data,
        args.parameterization,
        args.matcher,
        ipc=args.ipc,
        iterations=total,
        generator=generator,
        batch_real_per_class=args.batch_real,
        include_mean=False,
        lr_codes=0.01,  # one value for every space: the work per iteration does not depend on it
        lr_network=0.001,
        matcher_args=matcher_kwargs,
        device="cpu",
    )
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: stamps.append(time.perf_counter()))
    trainer.add_event_handler(Events.COMPLETED, lambda _: stamps.append(time.perf_counter()))
    before = _rss_mb()
    trainer.run()
    durations = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][args.warmup :]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": durations, "peak_mb": peak, "before_mb": before}


def make_experts(size: int, folder: str) -> None:
    """Two short expert trajectories on random data of the cell's shape (MTT needs some to read)."""
    from monai_pld.data import ImageSet
    from monai_pld.engines.experts import train_experts

    channels, classes = SHAPES[size]
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (classes * 50, channels, size, size), dtype=torch.uint8, generator=gen)
    data = ImageSet(images, torch.arange(classes).repeat_interleave(50), [str(c) for c in range(classes)])
    train_experts(data, folder, num_experts=2, epochs=2, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--dc-loops", default="glad")
    parser.add_argument("--matchers", nargs="+", default=list(MATCHERS))
    parser.add_argument("--cell", nargs=3, metavar=("MATCHER", "PARAM", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--expert-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        args.matcher, args.parameterization, args.size = args.cell[0], args.cell[1], int(args.cell[2])
        print(json.dumps(run_cell(args)))
        return

    results: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            expert_dir = os.path.join(tmp, f"experts_{size}")
            if "mtt" in args.matchers:
                make_experts(size, expert_dir)
            for matcher in args.matchers:
                for _ in range(args.rounds):
                    for param in PARAMETERIZATIONS:
                        cmd = [
                            sys.executable,
                            __file__,
                            "--cell",
                            matcher,
                            param,
                            str(size),
                            "--expert-dir",
                            expert_dir,
                        ]
                        for key in (
                            "ipc",
                            "batch_real",
                            "per_class",
                            "iters",
                            "warmup",
                            "threads",
                            "syn_steps",
                            "dc_loops",
                        ):
                            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                        cell = json.loads(out.stdout.strip().splitlines()[-1])
                        entry = results.setdefault((size, matcher, param), {"seconds": [], "peak_mb": [], "grow": []})
                        entry["seconds"] += cell["seconds"]
                        entry["peak_mb"].append(cell["peak_mb"])
                        entry["grow"].append(cell["peak_mb"] - cell["before_mb"])
                        print(
                            f"{size}px {matcher} {param}: {statistics.median(cell['seconds']):.3f} s/it, "
                            f"peak {cell['peak_mb']:.0f} MB",
                            file=sys.stderr,
                        )

    print(
        f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPUs), torch "
        f"{torch.__version__}, {args.threads} threads; IPC {args.ipc}, {args.batch_real} real images per class, "
        f"MTT syn_steps {args.syn_steps}, DC loops {args.dc_loops}; median of {args.rounds} x {args.iters} "
        "iterations.\n"
    )
    print("| image size | matcher | parameterisation | s/it | slfd / latent | peak RSS (MB) | growth during run (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (size, matcher, param), entry in results.items():
        median = statistics.median(entry["seconds"])
        latent = statistics.median(results[(size, matcher, "latent")]["seconds"])
        ratio = f"{median / latent:.2f}" if param == "slfd" else ""
        print(
            f"| {size} | {matcher} | {param} | {median:.3f} | {ratio} | {max(entry['peak_mb']):.0f} | "
            f"{max(entry['grow']):.0f} |"
        )


if __name__ == "__main__":
    main()
