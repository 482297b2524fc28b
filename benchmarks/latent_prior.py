"""Pixel, deterministic-latent and probabilistic-latent (SLFD) rows distilled under one budget and evaluated
across architectures, with the generator's quality and the distilled layer as explicit variables.

Run (model selection, on the validation split):
    python benchmarks/latent_prior.py --dataset retinamnist --data-dir ../shared/data --split val \
        --rows pixel latent slfd latent:L2 slfd:L2 --ipc 10 --iterations 200 --out docs/latent_prior/retina_val
Final table (test split), two distillation seeds, four backbones:
    python benchmarks/latent_prior.py --dataset retinamnist --data-dir ../shared/data --split test --seeds 0 1 \
        --rows random pixel latent slfd latent:L2 slfd:L2 --backbones convnet alexnet vgg11 resnet18 ...
DC rows with GLaD's loops (one outer step per network): --matcher dc --matcher-args '{"loops": "glad"}'.
Any MedMNIST-layout npz (e.g. Fashion-MNIST from ../shared/data/get-fashion-mnist.sh) with --dataset custom
--data-dir /path/fashionmnist.npz; a small archive (its generator pretrained on it alone) the same way, from
python benchmarks/small_archive_npz.py ../shared/data/retinamnist.npz retina600.npz --n 600. The generated
five-class set of benchmarks/comparison.py with --synthetic (written to a temporary folder; the generator cached as
generators/synthetic_28px_autoencoderkl.pt unless --generator-path says otherwise).
Tables only, from saved results: python benchmarks/latent_prior.py --report out.json [more.json]

A row is ``kind[:L<layer>][:lr=<lr_codes>][:net=<lr_network>][:v=<init_log_var>][:vmax=<log_var_max>]
[:s=<samples>][:kl=<weight>][:u][:resample]``: ``kind`` is random, full, pixel, latent or slfd; ``L2`` distils into
the feature map after decoder block 2 instead of the bottleneck; ``lr=`` overrides the per-space default learning
rate; ``net=`` the learning rate of SLFD's network (its mean, variance and factor heads); ``v=`` SLFD's initial
log-variance; ``vmax=`` the upper clamp of its log-variance (default 1); ``s=`` sets SLFD's samples per slot
(antithetic when even, unless ``u``); ``kl=`` weights the KL of each SLFD slot to its class's latent Gaussian
(default 0); ``u`` uses DM's unbiased estimator (two independent halves of the samples, so ``s=`` must be even);
``resample`` evaluates SLFD with fresh samples every epoch instead of its means. Every row of one seed starts from
the same seeded real images and is distilled for ``--iterations`` steps with the bundle's defaults
for everything not named.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from comparison import output_file, synthetic_medmnist  # benchmarks/, on the path when run as a script
from ignite.engine import Events

from monai_pld.data import ImageSet, load_dataset
from monai_pld.defaults import UNSELECTED_NETWORK_RATE, default_learning_rates
from monai_pld.engines.generator import pretrain_generator
from monai_pld.evaluation import ImageSource, load_image_source, train_and_test
from monai_pld.formats import export_distilled_set, load_distribution
from monai_pld.networks.generators import PixelGenerator, load_generator
from monai_pld.parameterizations import SLFDistribution
from monai_pld.utils import derive_seed
from monai_pld.workflows import build_trainer


def parse_row(spec: str) -> dict:
    """``slfd:L2:lr=0.03:s=2:resample`` -> its settings."""
    kind, *options = spec.split(":")
    row = {"spec": spec, "kind": kind, "latent_layer": 0, "lr_codes": "auto", "samples": 1, "mode": "mean"}
    row.update(unbiased=False, kl_weight=0.0, lr_network="auto", init_log_var=None, log_var_max=None)
    for option in options:
        if option.startswith("L"):
            row["latent_layer"] = int(option[1:])
        elif option.startswith("lr="):
            row["lr_codes"] = float(option[3:])
        elif option.startswith("net="):
            row["lr_network"] = float(option[4:])
        elif option.startswith("vmax="):
            row["log_var_max"] = float(option[5:])
        elif option.startswith("v="):
            row["init_log_var"] = float(option[2:])
        elif option.startswith("s="):
            row["samples"] = int(option[2:])
        elif option.startswith("kl="):
            row["kl_weight"] = float(option[3:])
        elif option == "resample":
            row["mode"] = "resample"
        elif option == "u":
            row["unbiased"] = True
        else:
            raise ValueError(f"unknown row option {option!r} in {spec!r}")
    return row


def distil_row(row: dict, train, args, ipc: int, seed: int):
    """Distil one row; returns (source builder inputs): parameterisation, generator, seconds, final loss."""
    trainer = build_trainer(
        train,
        parameterization=row["kind"],
        matcher=args.matcher,
        ipc=ipc,
        iterations=args.iterations,
        generator_path=args.generator_path,
        generator_policy="any" if args.generator_any else "match",
        latent_layer=row["latent_layer"],
        lr_codes=row["lr_codes"],
        lr_network=row["lr_network"],
        parameterization_options={key: row[key] for key in ("init_log_var", "log_var_max") if row[key] is not None},
        samples_per_slot=row["samples"],
        antithetic=row["samples"] % 2 == 0 and not row["unbiased"],
        kl_weight=row["kl_weight"],
        batch_real_per_class=args.batch_real,
        seed=seed,
        device="cpu",
        matcher_args={**args.matcher_args, "estimator": "unbiased"} if row["unbiased"] else args.matcher_args,
        pretrain={
            "dataset_flag": args.dataset,
            "dataset_dir": args.data_dir,
            "image_size": train.image_size,
            "download": False,
            "steps": args.generator_steps,
        },
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0].get("loss", 0.0)))
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    final = statistics.fmean(losses[-10:]) if losses and row["kind"] not in ("random", "full") else None
    return trainer.parameterization, trainer.generator, seconds, final


def resolved_lr(row: dict, args, ipc: int) -> float | None:
    """The learning rate of the codes a row distils with (``auto`` resolved); ``None`` for real-image rows."""
    if row["kind"] in ("random", "full"):
        return None
    if row["lr_codes"] != "auto":
        return float(row["lr_codes"])
    return default_learning_rates(row["kind"], args.matcher, row["latent_layer"], ipc)[0]


def resolved_network_lr(row: dict, args, ipc: int) -> float | None:
    """The learning rate of SLFD's network a row distils with (``auto`` resolved); ``None`` for other kinds."""
    if row["kind"] != "slfd":
        return None
    if row["lr_network"] != "auto":
        return float(row["lr_network"])
    return default_learning_rates(row["kind"], args.matcher, row["latent_layer"], ipc, args.iterations)[1]


def set_name(row: dict, args, ipc: int, seed: int) -> str:
    """A name for every setting that changes a distilled set (not for how it is used, e.g. ``resample``)."""
    lr = row["lr_codes"]
    if (
        lr == "auto"
        and resolved_lr(row, args, ipc) != default_learning_rates(row["kind"], args.matcher, row["latent_layer"])[0]
    ):
        lr = resolved_lr(row, args, ipc)  # "auto" named the many-image value when these sets were first saved
    name = f"{row['kind']}_L{row['latent_layer']}_lr{lr}_s{row['samples']}_ipc{ipc}_seed{seed}"
    name += f"_it{args.iterations}_{Path(args.generator_path).stem}" + ("_unbiased" if row["unbiased"] else "")
    name += f"_kl{row['kl_weight']}" if row["kl_weight"] else ""
    net = resolved_network_lr(row, args, ipc)
    if net is not None and net != UNSELECTED_NETWORK_RATE:  # the only rate before it was selected: no suffix
        name += f"_net{net}"
    name += f"_v{row['init_log_var']}" if row["init_log_var"] is not None else ""
    name += f"_vmax{row['log_var_max']}" if row["log_var_max"] is not None else ""
    if args.matcher != "dm" or args.matcher_args:  # DM sets with the defaults keep the names they were saved under
        name += f"_{args.matcher}" + "".join(f"_{k}{v}" for k, v in sorted(args.matcher_args.items()))
    return name


def saved_or_distilled(row: dict, train, args, ipc: int, seed: int):
    """Distil a row, or read it back from ``--sets`` when an earlier run (e.g. the validation-split selection) wrote
    it with the same settings: the distilled set does not depend on the split it is later tested on."""
    name = set_name(row, args, ipc, seed)
    folder = Path(args.sets) / name
    if (folder / "distribution.pt").is_file():
        param = load_distribution(folder / "distribution.pt")
        if param.hyper_parameters["kind"] == "pixel":
            generator = PixelGenerator((train.channels, train.image_size, train.image_size))
        else:
            generator = load_generator(args.generator_path, latent_layer=param.hyper_parameters.get("latent_layer", 0))
        record = json.loads((folder / "record.json").read_text())
        return param, generator, record["seconds"], record["final_loss"]
    param, generator, seconds, loss = distil_row(row, train, args, ipc, seed)
    export_distilled_set(folder, param, generator, train.class_names)
    (folder / "record.json").write_text(json.dumps({"seconds": seconds, "final_loss": loss}))
    return param, generator, seconds, loss


def slot_spread(param) -> dict | None:
    """An SLFD set's spread, RMS per latent element: the network's shift of each slot's mean away from its code
    (``mu - u``), the noise around the mean (``sqrt(d + sum P^2)``) and, for scale, the spread of the codes across
    slots; with the range of the log-variance, which starts at ``init_log_var`` everywhere: whether the distribution
    was learnt or kept its start."""
    if not isinstance(param, SLFDistribution) or not param.stochastic:
        return None
    with torch.no_grad():
        mu, factor, diag = param.parameters_of_distribution()
        noise_var = diag + factor.pow(2).sum(-1)
        return {
            "mean_shift_rms": (mu - param.codes.flatten(1)).pow(2).mean().sqrt().item(),
            "noise_rms": noise_var.mean().sqrt().item(),
            "code_spread_rms": param.codes.flatten(1).std(0).pow(2).mean().sqrt().item(),
            "log_var_range": [diag.log().min().item(), diag.log().max().item()],
        }


def evaluate(source, train, test, args, seed, backbones):
    mean, std = train.normalization()
    results = []
    for backbone in backbones:
        for run in range(args.runs):
            m = train_and_test(
                backbone,
                source,
                test,
                mean,
                std,
                protocol=args.protocol,
                epochs=args.epochs,
                seed=derive_seed(seed, 100 + run),
                device="cpu",
            )
            results.append({"backbone": backbone, "run": run, "seed": seed, **m})
            # progress: a 4-backbone row at 300 epochs takes tens of minutes on one core
            acc, secs = 100 * m["accuracy"], m["train_seconds"]
            print(f"  {backbone} (seed {seed}, classifier {run}): {acc:.1f} % in {secs:.0f} s", flush=True)
    return results


def report(paths: list[str]) -> str:
    """Markdown tables (accuracy, macro AUC) over seeds and classifiers, from saved results."""
    rows: dict[tuple, list] = {}
    backbones: list[str] = []
    for path in paths:
        for entry in json.loads(Path(path).read_text())["rows"]:
            rows.setdefault((entry["row"], entry["ipc"]), []).extend(entry["results"])
            for r in entry["results"]:
                if r["backbone"] not in backbones:
                    backbones.append(r["backbone"])
    lines = []
    for key, scale, digits, name in (("accuracy", 100, 1, "accuracy (%)"), ("auc", 1, 3, "macro AUC")):
        lines += [f"\n{name}: mean ± std over distillation seeds x classifiers\n"]
        lines.append("| row | IPC | " + " | ".join(backbones) + " | cross-arch (non-ConvNet) |")
        lines.append("|" + " --- |" * (len(backbones) + 3))
        for (row, ipc), results in rows.items():
            cells, cross = [], []
            for b in backbones:
                values = [scale * r[key] for r in results if r["backbone"] == b]
                if not values:
                    cells.append("")
                    continue
                mean = f"{statistics.fmean(values):.{digits}f}"
                # a single value has no spread to show: no "± 0" that would read as a measured one
                cells.append(
                    f"{mean} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"
                    if len(values) > 1
                    else f"{mean} (n=1)"
                )
                if b != "convnet":
                    cross.append(statistics.fmean(values))
            cross_cell = f"{statistics.fmean(cross):.{digits}f}" if cross else ""
            lines.append(f"| {row} | {ipc} | " + " | ".join(cells) + f" | {cross_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="retinamnist")
    parser.add_argument("--data-dir", default=os.environ.get("MONAI_PLD_DATA", "../shared/data"))
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="use comparison.py's generated five-class set (RetinaMNIST's layout) instead of --dataset/--data-dir",
    )
    parser.add_argument("--split", default="val", choices=["val", "test"], help="where classifiers are tested")
    parser.add_argument("--rows", nargs="+", default=["random", "pixel", "latent", "slfd"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[10])
    parser.add_argument("--matcher", default="dm", choices=["dm", "dc"])
    parser.add_argument(
        "--matcher-args", type=json.loads, default={}, help='matcher settings as JSON, e.g. \'{"loops": "glad"}\''
    )
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--backbones", nargs="+", default=["convnet", "alexnet"])
    parser.add_argument("--runs", type=int, default=2, help="classifiers per backbone and distilled set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="distillation seeds")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--protocol", default="dc", choices=["dc", "glad"])
    parser.add_argument("--generator-path", default=None, help="default generators/<dataset>_<size>px_autoencoderkl.pt")
    parser.add_argument("--generator-any", action="store_true", help="use --generator-path whatever made it")
    parser.add_argument("--generator-steps", type=int, default=None, help="default: the bundle's")
    parser.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="distil from this many training images (stratified); a generator pretrained here still sees the whole "
        "split: for a small archive write it with benchmarks/small_archive_npz.py and use --dataset custom",
    )
    parser.add_argument(
        "--sets", default="results/latent_prior_sets", help="folder where distilled sets are kept and reused"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/latent_prior/run")
    parser.add_argument("--report", nargs="+", metavar="JSON")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(args.threads)
    # the project's progress lines (generator pretraining, distillation) on stderr; the tables go to stdout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.synthetic:  # deterministic (seeded), so every run writes the same file
        args.dataset, args.data_dir = "retinamnist", tempfile.mkdtemp(prefix="monai_pld_synth_")
        synthetic_medmnist(Path(args.data_dir))
        args.generator_path = args.generator_path or "generators/synthetic_28px_autoencoderkl.pt"
    train = load_dataset(args.dataset, "train", args.data_dir, download=False)
    if args.max_train is not None:
        train = subsample(train, args.max_train)
    test = load_dataset(args.dataset, args.split, args.data_dir, download=False)
    if args.generator_path is None:
        args.generator_path = f"generators/{args.dataset}_{train.image_size}px_autoencoderkl.pt"
    if args.generator_steps is None:
        args.generator_steps = inspect.signature(pretrain_generator).parameters["steps"].default
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"{args.dataset}: {len(train)} train / {len(test)} {args.split} images; {args.matcher.upper()} "
        f"{args.iterations} iterations, batch_real {args.batch_real}/class; protocol {args.protocol} {args.epochs} "
        f"epochs, {args.runs} classifier(s) per backbone and seed; seeds {args.seeds}; {datetime.date.today()}, "
        f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} thread(s))"
    )
    print(header, flush=True)
    table = []
    distilled: dict[tuple, tuple] = {}  # rows that differ only in how they are evaluated share one distillation
    for ipc in args.ipc:
        for spec in args.rows:
            row = parse_row(spec)
            results, seconds_all, losses, spreads = [], [], [], []
            for seed in args.seeds:
                if row["kind"] in ("random", "full"):
                    source = load_image_source(row["kind"], train, ipc=ipc, seed=seed)
                    seconds, loss = 0.0, None
                else:
                    key = set_name(row, args, ipc, seed)  # rows that differ only in how the set is used share it
                    if key not in distilled:
                        distilled[key] = saved_or_distilled(row, train, args, ipc, seed)
                    param, generator, seconds, loss = distilled[key]
                    spreads.append(slot_spread(param))
                    source = ImageSource.from_distribution(param, generator, {"kind": spec}, row["mode"], seed)
                results += evaluate(source, train, test, args, seed, args.backbones)
                seconds_all.append(seconds)
                losses.append(loss)
            table.append(
                {
                    "row": spec,
                    "ipc": ipc,
                    "lr_codes": resolved_lr(row, args, ipc),
                    "lr_network": resolved_network_lr(row, args, ipc),
                    "results": results,
                    "distil_seconds": seconds_all,
                    "final_loss": losses,
                    **({"slot_spread": spreads} if any(spreads) else {}),
                }
            )
            accs = {b: statistics.fmean(r["accuracy"] for r in results if r["backbone"] == b) for b in args.backbones}
            print(
                f"{spec} ipc {ipc}: "
                + ", ".join(f"{b} {100 * a:.1f}" for b, a in accs.items())
                + f"; distil {statistics.fmean(seconds_all):.0f}s, final loss {losses}",
                flush=True,
            )
            output_file(out, ".json").write_text(json.dumps({"header": header, "args": vars(args), "rows": table}))
    meta = {}
    if os.path.isfile(args.generator_path):
        meta = load_generator(args.generator_path).metadata
    text = header + "\n" + report([str(output_file(out, ".json"))])
    if meta:
        text += (
            f"\n\ngenerator {args.generator_path}: {meta.get('steps')} steps on {meta.get('train_images')} images, "
            f"validation PSNR {meta.get('val_psnr', float('nan')):.1f} dB, "
            f"SSIM {meta.get('val_ssim', float('nan')):.3f}"
        )
    output_file(out, ".md").write_text(text + "\n")
    print(text)


def subsample(train, n: int):
    """A stratified, seeded subset of ``n`` training images (a small archive)."""
    gen = torch.Generator().manual_seed(0)
    per_class = max(1, n // train.num_classes)
    index = torch.cat([i[torch.randperm(len(i), generator=gen)[:per_class]] for i in train.class_indices()])
    return ImageSet(train.images[index], train.labels[index], train.class_names, train.name)


if __name__ == "__main__":
    main()
