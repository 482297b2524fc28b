"""Side-by-side comparison of every row of a distillation table, on the same data, seeds and evaluation protocol.

Run: python benchmarks/comparison.py --dataset retinamnist --data-dir ../shared/data [--ipc 1 10] [--iterations 300]
         [--matcher dm] [--backbones convnet alexnet] [--runs 2] [--epochs 150] [--skip-full]
         [--ablation | --ablation-only] [--synthetic] [--out docs/comparison]
     python benchmarks/comparison.py --report docs/comparison/retinamnist_ipc1.json [more .json]   # tables only

Rows: full, random, pixel, latent, slfd (mean) and slfd (resample: fresh samples every training epoch), all
distilled with ``--matcher`` (DM, or DC with one outer step per network) for ``--iterations`` steps from the same
seeded initial images, then evaluated by training every backbone ``--runs`` times from scratch (DC protocol,
``--epochs``) and testing on the real test split. With ``--ablation`` it also distils SLFD-DM at IPC 10 with rank
0, 1, 4, 8, 16 and KL weights 0, 0.01, 0.1 (ConvNet only; ``--ablation-only`` skips the main table). The ``full``
row trains ``--full-epochs`` epochs ``--full-runs`` times (the whole training split costs many batches per epoch).
``--synthetic`` replaces the real data by a generated set in RetinaMNIST's layout (five classes of textured blobs
with noise; see :func:`synthetic_medmnist`).
Prints markdown tables (mean +- std per backbone, cross-architecture average over the non-ConvNet backbones) and
writes them, the raw results (``.json``) and a bar chart (``.png``) next to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_pld.data import load_dataset
from monai_pld.evaluation import ImageSource, load_image_source, summarise, train_and_test
from monai_pld.utils import derive_seed
from monai_pld.workflows import build_trainer


def distil(kind, train, generator_path, args, ipc, rank=8, kl_weight=0.0):
    """Distil one row with ``args.matcher``; returns the parameterisation, its generator and seconds taken."""
    trainer = build_trainer(
        train,
        kind,
        args.matcher,
        ipc=ipc,
        iterations=args.iterations,
        generator_path=generator_path,
        rank=rank,
        kl_weight=kl_weight,
        batch_real_per_class=args.batch_real,
        seed=args.seed,
        device="cpu",
        # DC with one outer step per network (GLaD's loops): the reference's 10 x 50 loops at IPC 10 are hours on a CPU
        matcher_args={"loops": "glad"} if args.matcher == "dc" else {},
        pretrain={
            "dataset_flag": args.dataset,
            "dataset_dir": args.data_dir,
            "image_size": train.image_size,
            "download": False,
            "steps": args.generator_steps,
        },
    )
    start = time.perf_counter()
    trainer.run()
    return trainer.parameterization, trainer.generator, time.perf_counter() - start


def source_for(row, param, generator, train, ipc, seed):
    if row in ("full", "random"):
        return load_image_source(row, train, ipc=ipc, seed=seed)
    mode = "resample" if row == "slfd (resample)" else "mean"
    return ImageSource.from_distribution(param, generator, {"kind": row}, mode, seed)


def evaluate(source, train, test, args, backbones, epochs=None, runs=None):
    mean, std = train.normalization()
    results = []
    for backbone in backbones:
        for run in range(runs or args.runs):
            m = train_and_test(
                backbone,
                source,
                test,
                mean,
                std,
                protocol="dc",
                epochs=epochs or args.epochs,
                seed=derive_seed(args.seed, run),
                device="cpu",
            )
            results.append({"backbone": backbone, "run": run, **m})
    return summarise(results)


def fmt(summary, backbones):
    cells = []
    for b in backbones:
        v = summary["per_backbone"][b]
        cells.append(f"{100 * v['accuracy']:.1f} ± {100 * v['accuracy_std']:.1f}")
    cross = summary["cross_architecture_accuracy"]
    cells.append(f"{100 * cross:.1f}" if cross is not None else "")
    return cells


def report(paths: list[str]) -> None:
    """Tables of accuracy, macro AUC and macro F1 (mean over runs, and over the non-ConvNet backbones) from the
    ``.json`` files of earlier runs."""
    rows = [row for path in paths for row in json.loads(Path(path).read_text())["rows"]]
    backbones = list(rows[0]["summary"]["per_backbone"])
    for key, scale, name in (("accuracy", 100, "accuracy (%)"), ("auc", 1, "macro AUC"), ("f1", 1, "macro F1")):
        digits = 1 if scale == 100 else 3
        print(f"\n{name}, mean ± std over runs\n")
        print("| row | IPC | " + " | ".join(backbones) + " | cross-arch (non-ConvNet) |")
        print("|" + " --- |" * (len(backbones) + 3))
        for row in rows:
            per = row["summary"]["per_backbone"]
            cells = [f"{scale * per[b][key]:.{digits}f} ± {scale * per[b][key + '_std']:.{digits}f}" for b in backbones]
            cross = [per[b][key] for b in backbones if b != row["summary"]["distil_backbone"]]
            ipc = "all" if row["row"] == "full" else row["ipc"]
            cross_cell = f"{scale * statistics.fmean(cross):.{digits}f}" if cross else ""
            print(f"| {row['row']} | {ipc} | " + " | ".join(cells) + f" | {cross_cell} |")


def output_file(out: Path, suffix: str) -> Path:
    """The file ``suffix`` of the output stem ``out``: ``out`` may name no suffix (``runs/a_lr0.01``, whose dot is part
    of the name, not a suffix to replace) or one of the outputs' (``runs/a.json``)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    return stem.with_name(stem.name + suffix)


def synthetic_medmnist(folder: Path, per_class: int = 120, size: int = 28, seed: int = 0) -> Path:
    """A five-class set in the MedMNIST npz layout whose classes differ in colour, blob size and texture, under
    strong per-image noise and random positions, so that it is learnable but not trivially separable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    colours = np.array([[200, 90, 90], [90, 200, 90], [90, 90, 200], [180, 180, 80], [170, 90, 180]])
    arrays = {}
    for split, n in (("train", per_class), ("val", per_class // 5), ("test", per_class // 2)):
        images, labels = [], []
        for c in range(5):
            for _ in range(n):
                cy, cx = rng.integers(6, size - 6, 2)
                radius = 4 + c + rng.normal(0, 1.5)
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(float)
                stripes = 0.5 + 0.5 * np.sin((xx + yy) * (0.3 + 0.25 * c) + rng.uniform(0, 6.3))
                background = rng.uniform(60, 120, 3)
                image = background + blob[..., None] * (colours[c] * stripes[..., None] - background) * 0.6
                image = image + rng.normal(0, 45, image.shape)
                images.append(np.clip(image, 0, 255).astype(np.uint8))
                labels.append(c)
        order = rng.permutation(len(labels))
        arrays[f"{split}_images"] = np.stack(images)[order]
        arrays[f"{split}_labels"] = np.array(labels, np.uint8)[order, None]
    path = folder / "retinamnist.npz"  # RetinaMNIST's layout (5 classes, 28 px RGB) so the MedMNIST loader reads it
    np.savez_compressed(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="retinamnist")
    parser.add_argument("--data-dir", default=os.environ.get("MONAI_PLD_DATA", "../shared/data"))
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--matcher", default="dm", choices=["dm", "dc"])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--backbones", nargs="+", default=["convnet", "alexnet", "resnet18"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--generator-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--ablation-only", action="store_true")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--full-epochs", type=int, default=30)
    parser.add_argument("--full-runs", type=int, default=1)
    parser.add_argument("--synthetic", action="store_true", help="generated five-class data instead of --dataset")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/comparison")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="only print the tables of earlier runs' .json")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    torch.set_num_threads(args.threads)
    if args.synthetic:
        args.data_dir = tempfile.mkdtemp(prefix="monai_pld_synth_")
        synthetic_medmnist(Path(args.data_dir))
        args.dataset = "retinamnist"
    train = load_dataset(args.dataset, "train", args.data_dir, download=False)
    test = load_dataset(args.dataset, "test", args.data_dir, download=False)
    generator_path = Path(args.data_dir if args.synthetic else "generators") / (
        f"{args.dataset}_{train.image_size}px_autoencoderkl.pt"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)
        output_file(out, ".md").write_text("\n".join(lines) + "\n")

    header = ["row", "IPC", *args.backbones, "cross-arch (non-ConvNet)", "distil s"]
    name = "synthetic (RetinaMNIST layout)" if args.synthetic else args.dataset
    emit(
        f"{name}: {len(train)} train / {len(test)} test images; {args.matcher.upper()} {args.iterations} iterations"
        f"{' (one outer step per network)' if args.matcher == 'dc' else ''}, batch_real "
        f"{args.batch_real}/class; DC protocol {args.epochs} epochs ({args.full_epochs} for full), {args.runs} runs "
        f"per backbone ({args.full_runs} for full); seed {args.seed}; {datetime.date.today()}, {platform.machine()} "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} thread(s))"
    )
    emit()
    table = []
    if not args.ablation_only:
        emit("| " + " | ".join(header) + " |")
        emit("|" + " --- |" * len(header))
    for ipc in [] if args.ablation_only else args.ipc:
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
            if row == "full":
                summary = evaluate(source, train, test, args, args.backbones, args.full_epochs, args.full_runs)
            else:
                summary = evaluate(source, train, test, args, args.backbones)
            cells = [row, str(ipc if row != "full" else "all"), *fmt(summary, args.backbones), f"{seconds:.0f}"]
            emit("| " + " | ".join(cells) + " |")
            table.append({"row": row, "ipc": ipc, "summary": summary, "distil_seconds": seconds})
            output_file(out, ".json").write_text(json.dumps({"args": vars(args), "rows": table}, indent=2))
    if table:
        plot(table, args.backbones, output_file(out, ".png"), name)
    if generator_path.is_file():  # how well the generator reconstructs: what bounds every latent row
        from monai_pld.networks.generators import load_generator

        metadata = load_generator(generator_path).metadata
        emit()
        emit(f"generator {generator_path}: validation PSNR {metadata.get('val_psnr', float('nan')):.1f} dB")
    if args.ablation or args.ablation_only:
        emit()
        emit("Ablation, SLFD-DM at IPC 10, ConvNet accuracy (%), mean and slfd (resample)")
        emit()
        emit("| rank | KL weight | ConvNet (mean) | ConvNet (resample) | distil s |")
        emit("| --- | --- | --- | --- | --- |")
        ablation = []
        for rank, kl in [(0, 0.0), (1, 0.0), (4, 0.0), (8, 0.0), (16, 0.0), (8, 0.01), (8, 0.1)]:
            param, generator, seconds = distil("slfd", train, generator_path, args, 10, rank=rank, kl_weight=kl)
            cells = []
            for row in ("slfd (mean)", "slfd (resample)"):
                source = source_for(row, param, generator, train, 10, args.seed)
                v = evaluate(source, train, test, args, ["convnet"])["per_backbone"]["convnet"]
                cells.append(f"{100 * v['accuracy']:.1f} ± {100 * v['accuracy_std']:.1f}")
                ablation.append({"rank": rank, "kl_weight": kl, "row": row, **v})
            emit(f"| {rank} | {kl} | {cells[0]} | {cells[1]} | {seconds:.0f} |")
            ablation_json = output_file(out, ".json") if args.ablation_only else output_file(out, "_ablation.json")
            ablation_json.write_text(json.dumps({"args": vars(args), "rows": ablation}, indent=2))


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
    ax.set_title(f"{dataset}: same seeds and protocol", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
