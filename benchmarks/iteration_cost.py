"""Seconds per DM distillation iteration: SLFD (rank 8) against deterministic rank-0 parameterisations.

Run: python benchmarks/iteration_cost.py [--ipc 10] [--batch-real 64] [--image-size 28] [--rounds 5] [--iters 5]

All parameterisations share one generator (an untrained AutoencoderKL of the default size: the cost does not depend
on its weights), one matcher configuration and the same batch sizes. They are timed interleaved, round by round,
so that machine noise affects them alike; the table reports medians and the ratio to the `latent` baseline.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from monai_pld.data import ImageSet
from monai_pld.engines import DistillationTrainer
from monai_pld.networks.generators import AutoencoderKLGenerator, PixelGenerator, at_layer, default_autoencoder_config
from monai_pld.workflows import build_trainer

VARIANTS = {
    "latent (deterministic codes)": dict(kind="latent"),
    "slfd rank 0, no diagonal (deterministic)": dict(kind="slfd", rank=0, diagonal=False),
    "slfd rank 8": dict(kind="slfd", rank=8),
    "slfd rank 8, 2 antithetic samples": dict(kind="slfd", rank=8, samples=2, antithetic=True),
    "slfd rank 8 + its means (include_mean, the default)": dict(kind="slfd", rank=8, include_mean=True),
    "latent, decoder block 2 (latent_layer 2)": dict(kind="latent", latent_layer=2),
    "pixel": dict(kind="pixel"),
}


def synthetic_set(num_classes: int, per_class: int, size: int, channels: int = 3) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_classes * per_class, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return ImageSet(images, labels, [f"class{c}" for c in range(num_classes)], "synthetic")


def make_trainer(spec: dict, data: ImageSet, generator, ipc: int, batch_real: int, iters: int) -> DistillationTrainer:
    if spec["kind"] == "pixel":
        generator = PixelGenerator((data.channels, data.image_size, data.image_size))
    return build_trainer(
        data,
        spec["kind"],
        "dm",
        ipc=ipc,
        iterations=iters,
        generator=at_layer(generator, spec.get("latent_layer", 0)),
        rank=spec.get("rank", 8),
        parameterization_options={"diagonal": spec["diagonal"]} if "diagonal" in spec else None,
        batch_real_per_class=batch_real,
        samples_per_slot=spec.get("samples", 1),
        antithetic=spec.get("antithetic", False),
        include_mean=spec.get("include_mean", False),
        lr_codes=0.01,  # one value for every space: the work per iteration does not depend on it
        lr_network=0.001,
        device="cpu",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="iterations per timed round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = synthetic_set(args.classes, max(args.batch_real, args.ipc) * 2, args.image_size)
    generator = AutoencoderKLGenerator(**default_autoencoder_config(args.image_size, 3)).freeze()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds + 1):  # round 0 is a warm-up
        for name, spec in VARIANTS.items():
            trainer = make_trainer(spec, data, generator, args.ipc, args.batch_real, args.iters)
            start = time.perf_counter()
            trainer.run()
            if round_index:
                times[name].append((time.perf_counter() - start) / args.iters)
    base = statistics.median(times["latent (deterministic codes)"])
    det = statistics.median(times["slfd rank 0, no diagonal (deterministic)"])
    print(
        f"date {datetime.date.today()}, torch {torch.__version__}, {args.threads} threads, {platform.machine()}, "
        f"{args.classes} classes x ipc {args.ipc}, {args.batch_real} real/class, {args.image_size} px, "
        f"{args.rounds} rounds x {args.iters} iterations"
    )
    print("| parameterisation | s/it (median) | ratio to latent | ratio to slfd rank 0 |")
    print("| --- | --- | --- | --- |")
    for name in VARIANTS:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {t / base:.2f} | {t / det:.2f} |")


if __name__ == "__main__":
    main()
