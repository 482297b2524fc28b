"""What the privacy audit says about real distilled sets, and what it costs.

Run: python benchmarks/privacy_audit.py --data-dir ../shared/data [--iterations 2 200] [--threads 1] [--scale]

Verdicts (RetinaMNIST, the real file): the ``random`` baseline (IPC 10 real training images: the audit must flag
them), and DM-distilled sets at IPC 10 from the same seeded real initialisation (``pixel``, ``latent``, ``slfd``)
after each of ``--iterations`` (a barely trained set, still close to its initial real images, and a finished one), and
``slfd`` initialised from noise. Every set is audited with the export defaults (5th percentile of the held-out test
images, ConvNet features after one epoch) and reported as near-copies, exact copies, the smallest RMS distance to a
training image against the threshold, and the membership-inference AUC in pixel and feature space.

With ``--scale`` it also times the audit at PathMNIST's size (89,996 training and 7,180 test images of 3 x 28 x 28,
90 synthetic images; random pixels, since the cost does not depend on them): the defaults (every training image as
reference, 2,000 held-out images, the feature network one epoch on 20,000 images), pixels only, and pixels against
a 20,000-image reference sample.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from monai_pld.data import ImageSet, load_dataset
from monai_pld.sharing.privacy import audit_privacy
from monai_pld.workflows import build_generator, build_trainer


def distilled_set(
    kind: str, init: str, iterations: int, train: ImageSet, args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images of one row, rendered from the means as the exporter does."""
    generator = build_generator(
        "pixel" if kind in ("pixel", "random") else kind,
        train,
        Path("generators") / f"{train.name}_{train.image_size}px_autoencoderkl.pt",
        "cpu",
        dataset_flag=train.name,
        dataset_dir=args.data_dir,
        image_size=train.image_size,
        download=False,
    )
    trainer = build_trainer(
        train,
        kind,
        "dm",
        ipc=args.ipc,
        iterations=iterations,
        generator=generator,
        init=init,
        include_mean=False,
        lr_codes=0.01,
        lr_network=0.001,
        batch_real_per_class=64,
        seed=args.seed,
        device="cpu",
    )
    if kind != "random":
        trainer.run()
    param = trainer.parameterization
    images, labels = param.render(generator, "mean")
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8), labels


def verdicts(args: argparse.Namespace) -> None:
    train = load_dataset("retinamnist", "train", args.data_dir, download=False)
    test = load_dataset("retinamnist", "test", args.data_dir, download=False)
    print(
        f"\nRetinaMNIST ({len(train)} train / {len(test)} test), IPC {args.ipc}, DM, audit defaults (5th percentile of "
        "held-out test images, ConvNet features after one epoch)\n"
    )
    print(
        "| set | init | DM iterations | near-copies (pixel) | exact copies | min RMS distance | threshold | flagged in "
        "feature space | membership AUC (pixel / feature) | audit s |\n|" + " --- |" * 10
    )
    rows = [("random", "real", 0)]
    rows += [(k, i, n) for n in args.iterations for k, i in (("pixel", "real"), ("latent", "real"), ("slfd", "real"))]
    rows += [("slfd", "noise", max(args.iterations))]
    for kind, init, iterations in rows:
        images, labels = distilled_set(kind, init, iterations, train, args)
        start = time.perf_counter()
        audit = audit_privacy(images, labels, train, test, seed=args.seed)
        seconds = time.perf_counter() - start
        print(
            f"| {kind} | {init} | {iterations} | {audit['near_copies']}/{len(images)} | {audit['exact_copies']} | "
            f"{audit['pixel']['min_distance']:.4f} | {audit['pixel']['threshold']:.4f} | "
            f"{sum(audit['feature']['flagged'])}/{len(images)} | "
            f"{audit['membership_auc']:.3f} / {audit['membership_auc_feature']:.3f} | {seconds:.1f} |",
            flush=True,
        )


def scale() -> None:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ImageSet:
        images = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=gen)
        return ImageSet(images, torch.arange(n) % 9, [str(c) for c in range(9)], "pathmnist")

    train, test = split(89996), split(7180)
    synthetic = torch.randint(0, 256, (90, 3, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.arange(90) % 9
    print("\nPathMNIST size (89,996 train, 7,180 test, 90 synthetic, 3 x 28 x 28)\n")
    print("| reference images | held-out images | feature epochs | seconds |\n| --- | --- | --- | --- |")
    for reference, heldout, epochs in ((None, 2000, 1), (None, 2000, 0), (20000, 2000, 0)):
        start = time.perf_counter()
        audit_privacy(
            synthetic, labels, train, test, feature_epochs=epochs, max_reference=reference, max_heldout=heldout
        )
        seconds = time.perf_counter() - start
        print(f"| {reference or 'all 89,996'} | {heldout} | {epochs} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("MONAI_PLD_DATA", "../shared/data"))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, nargs="+", default=[2, 200])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--skip-verdicts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({args.threads} thread(s))"
    )
    if not args.skip_verdicts:
        verdicts(args)
    if args.scale:
        scale()


if __name__ == "__main__":
    main()
