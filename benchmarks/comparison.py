"""Side-by-side comparison of every row of a distillation table, on the same data, seeds and evaluation protocol.

Run: python benchmarks/comparison.py --dataset retinamnist --data-dir ../shared/data [--ipc 1 10] [--iterations 300]
         [--backbones convnet alexnet] [--runs 2] [--epochs 150] [--ablation] [--out docs/comparison]

Rows: full, random, pixel, latent, slfd (mean) and slfd (resample: fresh samples every training epoch), all
distilled with DM for ``--iterations`` steps from the same seeded initial images, then evaluated by training every
backbone ``--runs`` times from scratch (DC protocol, ``--epochs``) and testing on the real test split. With
``--ablation`` it also distils SLFD-DM at IPC 10 with rank 0, 1, 4, 8, 16 and KL weights 0, 0.01, 0.1 (ConvNet only).
Prints markdown tables (mean +- std per backbone, cross-architecture average over the non-ConvNet backbones) and
writes a bar chart next to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from monai_pld.builders import build_generator, build_matcher, build_optimizer, build_parameterization
from monai_pld.data import ClassBalancedBatches, load_dataset
from monai_pld.engines import DistillationTrainer
from monai_pld.engines.evaluation import ImageSource, load_image_source, summarise, train_and_test
from monai_pld.utils import derive_seed


def distil(kind, train, generator_path, args, ipc, rank=8, kl_weight=0.0):
    """Distil one row with DM; returns the parameterisation, its generator and seconds taken."""
    generator = build_generator(
        kind,
        train,
        generator_path,
        "cpu",
        dataset_flag=args.dataset,
        dataset_dir=args.data_dir,
        image_size=train.image_size,
        download=False,
        epochs=args.generator_epochs,
    )
    param = build_parameterization(kind, generator, train, ipc, rank=rank, seed=args.seed, kl_weight=kl_weight)
    matcher = build_matcher("dm", train, seed=args.seed)
    trainer = DistillationTrainer(
        "cpu",
        args.iterations,
        ClassBalancedBatches(train, args.batch_real, args.seed),
        param,
        generator,
        matcher,
        build_optimizer(param),
        kl_weight=kl_weight,
        seed=args.seed,
    )
    start = time.perf_counter()
    trainer.run()
    return param, generator, time.perf_counter() - start


def source_for(row, param, generator, train, ipc, seed):
    if row in ("full", "random"):
        return load_image_source(row, train, ipc=ipc, seed=seed)
    images, labels = param.render(generator, "mean")
    resample = None
    if row == "slfd (resample)":

        def resample(epoch):
            return param.render(generator, "sample", seed=derive_seed(seed, epoch))

    return ImageSource(images, labels, {"kind": row}, resample)


def evaluate(source, train, test, args, backbones):
    mean, std = train.normalization()
    runs = []
    for backbone in backbones:
        for run in range(args.runs):
            m = train_and_test(
                backbone,
                source,
                test,
                mean,
                std,
                protocol="dc",
                epochs=args.epochs,
                seed=derive_seed(args.seed, run),
                device="cpu",
            )
            runs.append({"backbone": backbone, "run": run, **m})
    return summarise(runs)


def fmt(summary, backbones):
    cells = []
    for b in backbones:
        v = summary["per_backbone"][b]
        cells.append(f"{100 * v['accuracy']:.1f} ± {100 * v['accuracy_std']:.1f}")
    cross = summary["cross_architecture_accuracy"]
    cells.append(f"{100 * cross:.1f}" if cross is not None else "")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="retinamnist")
    parser.add_argument("--data-dir", default=os.environ.get("MONAI_PLD_DATA", "../shared/data"))
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--backbones", nargs="+", default=["convnet", "alexnet", "resnet18"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--generator-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--out", default="docs/comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = load_dataset(args.dataset, "train", args.data_dir, download=False)
    test = load_dataset(args.dataset, "test", args.data_dir, download=False)
    generator_path = Path("generators") / f"{args.dataset}_{train.image_size}px_autoencoderkl.pt"
    header = ["row", "IPC", *args.backbones, "cross-arch (non-ConvNet)", "distil s"]
    print(
        f"{args.dataset}: {len(train)} train / {len(test)} test images; DM {args.iterations} iterations, DC "
        f"protocol {args.epochs} epochs, {args.runs} runs per backbone; {datetime.date.today()}, "
        f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}\n"
    )
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    table = []
    for ipc in args.ipc:
        cache: dict[str, tuple] = {}
        rows = ["random", "pixel", "latent", "slfd (mean)", "slfd (resample)"]
        if not args.skip_full and ipc == args.ipc[0]:
            rows = ["full", *rows]
        for row in rows:
            kind = {"slfd (mean)": "slfd", "slfd (resample)": "slfd"}.get(row, row)
            seconds = 0.0
            param = generator = None
            if kind in ("pixel", "latent", "slfd"):
                if kind not in cache:
                    cache[kind] = distil(kind, train, generator_path, args, ipc)
                param, generator, seconds = cache[kind]
            source = source_for(row, param, generator, train, ipc, args.seed)
            summary = evaluate(source, train, test, args, args.backbones)
            cells = [row, str(ipc if row != "full" else "all"), *fmt(summary, args.backbones), f"{seconds:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
            table.append({"row": row, "ipc": ipc, "summary": summary, "distil_seconds": seconds})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": table}, indent=2))
    plot(table, args.backbones, out.with_suffix(".png"), args.dataset)
    if args.ablation:
        print("\nAblation, SLFD-DM at IPC 10, ConvNet accuracy (%)\n")
        print("| rank | KL weight | ConvNet | distil s |\n| --- | --- | --- | --- |")
        for rank, kl in [(0, 0.0), (1, 0.0), (4, 0.0), (8, 0.0), (16, 0.0), (8, 0.01), (8, 0.1)]:
            param, generator, seconds = distil("slfd", train, generator_path, args, 10, rank=rank, kl_weight=kl)
            summary = evaluate(
                source_for("slfd (mean)", param, generator, train, 10, args.seed), train, test, args, ["convnet"]
            )
            v = summary["per_backbone"]["convnet"]
            print(
                f"| {rank} | {kl} | {100 * v['accuracy']:.1f} ± {100 * v['accuracy_std']:.1f} | {seconds:.0f} |",
                flush=True,
            )


def plot(table, backbones, path, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['row']}\nIPC {r['ipc']}" if r["row"] != "full" else "full" for r in table]
    values = [100 * statistics.fmean(r["summary"]["per_backbone"][b]["accuracy"] for b in backbones) for r in table]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(table)), 3.5))
    ax.bar(range(len(table)), values, color="#4C72B0")
    ax.set_xticks(range(len(table)), labels, fontsize=7)
    ax.set_ylabel("mean test accuracy over backbones (%)")
    ax.set_title(f"{dataset}: DM rows, same seeds and protocol", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
