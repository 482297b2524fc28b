"""Time to quality: the distillation wall time each parameterisation needs to reach the validation accuracy that
pixel DM reaches after ``--iterations`` steps.

Every row is distilled with the bundle's defaults (DM, IPC 10, 64 real images per class; latent rows in decoder
block 2 at their per-space learning rates, SLFD with its means matched beside one sample per slot). Every
``--every`` iterations, and before the first, the current set (the means) trains ``--runs`` ConvNets for
``--epochs`` epochs whose mean accuracy on the validation split is recorded with the seconds the iterations took so
far (the evaluations themselves are not counted). The target is pixel DM's accuracy at ``--iterations``, averaged
over seeds and classifiers; a row's time to quality is the first checkpoint at which its seed-averaged curve reaches
the target, and the seconds are those of its iterations up to there (mean over seeds). Generator pretraining is a
separate, one-off cost per dataset (see ``docs/benchmarks.md``) and is not included.

Run (a PathMNIST-shaped set with real content: RetinaMNIST, 28 px RGB; validation split only):

    python benchmarks/time_to_quality.py --dataset retinamnist --data-dir ../shared/data \\
        --generator-path retina_g.pt --seeds 0 1 --out docs/speed/time_to_quality_retinamnist

Any MedMNIST-layout npz works with ``--dataset custom --data-dir file.npz``. Curves can come from several runs
(e.g. one process per row, or a run stopped and continued): ``--curves-from a.json b.json`` reuses every
(row, seed) curve those files hold and runs only the missing ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from comparison import output_file  # benchmarks/, on the path when run as a script
from ignite.engine import Events

from monai_pld.data import ImageSource, load_dataset
from monai_pld.evaluation import train_and_test
from monai_pld.utils import derive_seed
from monai_pld.workflows import build_trainer


class Curve:
    """Iteration time (only) and the validation accuracy of the current set every ``every`` iterations."""

    def __init__(self, val, train, every: int, runs: int, epochs: int, seed: int) -> None:
        self.val, self.train, self.every, self.runs, self.epochs, self.seed = val, train, every, runs, epochs, seed
        self.seconds = 0.0
        self.points: list[dict] = []
        self._start = 0.0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)  # before the evaluation below
        engine.add_event_handler(Events.STARTED, self.evaluate)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.evaluate)

    def _started(self, engine) -> None:
        self._start = time.perf_counter()

    def _completed(self, engine) -> None:
        self.seconds += time.perf_counter() - self._start

    def evaluate(self, engine) -> None:
        images, labels = engine.parameterization.render(engine.generator, mode="mean")
        mean, std = self.train.normalization()
        source = ImageSource(images.detach().cpu(), labels.cpu(), {"kind": "current"})
        accs = [
            train_and_test(
                "convnet", source, self.val, mean, std, epochs=self.epochs, seed=derive_seed(self.seed, 100 + r)
            )["accuracy"]
            for r in range(self.runs)
        ]
        point = {"iteration": engine.state.iteration, "seconds": self.seconds, "accuracy": statistics.fmean(accs)}
        self.points.append(point)
        logging.getLogger("monai_pld").info(
            f"iteration {point['iteration']}: {100 * point['accuracy']:.1f} % after {point['seconds']:.0f} s"
        )


def first_reaching(points: list[list[dict]], target: float) -> dict | None:
    """The first checkpoint at which the seed-averaged accuracy reaches ``target`` (points: one curve per seed)."""
    for checkpoint in zip(*points, strict=True):
        accuracy = statistics.fmean(p["accuracy"] for p in checkpoint)
        if accuracy >= target:
            return {
                "iteration": checkpoint[0]["iteration"],
                "seconds": statistics.fmean(p["seconds"] for p in checkpoint),
                "accuracy": accuracy,
            }
    return None


def earlier_curves(paths: list[Path]) -> tuple[dict[tuple[str, int], list[dict]], list[str]]:
    """The curves of earlier runs by (row, seed), and their notes."""
    found: dict[tuple[str, int], list[dict]] = {}
    notes: list[str] = []
    for path in paths:
        data = json.loads(path.read_text())
        notes += data.get("notes", [])
        for kind, points in data["curves"].items():
            seeds = data["curve_seeds"][kind]
            found.update({(kind, seed): curve for seed, curve in zip(seeds, points, strict=True)})
    return found, list(dict.fromkeys(notes))  # a note carried through several merges is kept once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="retinamnist")
    parser.add_argument("--data-dir", default=os.environ.get("MONAI_PLD_DATA", "../shared/data"))
    parser.add_argument("--split", default="val", choices=["val"], help="accuracy is read on the validation split")
    parser.add_argument("--rows", nargs="+", default=["pixel", "latent", "slfd"])
    parser.add_argument("--iterations", type=int, default=200, help="pixel DM's budget that sets the target")
    parser.add_argument("--max-iterations", type=int, default=300, help="the latent rows' budget")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--runs", type=int, default=2, help="ConvNets per checkpoint")
    parser.add_argument("--epochs", type=int, default=100, help="as the bundles' eval_epochs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--generator-path", required=True, help="a pretrained generator of this dataset")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--curves-from",
        type=Path,
        nargs="+",
        default=[],
        help="earlier runs' JSON files: the (row, seed) curves they hold are reused, not run again",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: merge and report the --curves-from files, leaving out (row, seed) pairs they lack",
    )
    args = parser.parse_args()
    if args.report and not args.curves_from:
        parser.error("--report needs --curves-from")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train = load_dataset(args.dataset, "train", args.data_dir, download=False)
    val = load_dataset(args.dataset, args.split, args.data_dir, download=False)
    header = (
        f"{args.dataset}: {len(train)} train / {len(val)} {args.split} images; DM, IPC 10; ConvNet x {args.runs} x "
        f"{args.epochs} epochs per checkpoint every {args.every} iterations; "
    )
    if args.report:
        header += f"merged from {', '.join(str(p) for p in args.curves_from)}"
    else:
        header += (
            f"seeds {args.seeds}; {datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, torch "
            f"{torch.__version__} ({args.threads} thread(s)), load before {open('/proc/loadavg').read().split()[0]}"
        )
    print(header, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    earlier, notes = earlier_curves(args.curves_from)
    curves: dict[str, list[list[dict]]] = {}  # per row, one curve per seed of curve_seeds[row]
    curve_seeds: dict[str, list[int]] = {}
    for kind in args.rows:
        budget = args.iterations if kind == "pixel" else args.max_iterations
        curves[kind], curve_seeds[kind] = [], []
        for seed in args.seeds:
            points = earlier.get((kind, seed))
            if points is None and args.report:
                continue
            if points is None:
                curve = Curve(val, train, args.every, args.runs, args.epochs, seed)
                trainer = build_trainer(
                    train,
                    kind,
                    "dm",
                    iterations=budget,
                    generator_path=args.generator_path,
                    generator_policy="any",
                    seed=seed,
                    device="cpu",
                    handlers=[curve],
                )
                trainer.run()
                points = curve.points
            curves[kind].append(points)
            curve_seeds[kind].append(seed)
            record = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}}
            record.update(curves=curves, curve_seeds=curve_seeds, notes=notes)
            output_file(args.out, ".json").write_text(json.dumps(record))  # after every curve: nothing finished lost
    curves = {kind: points for kind, points in curves.items() if points}
    # seconds of iterations per iteration, from each curve's last checkpoint (the run's end)
    seconds_per_it = {k: statistics.fmean(c[-1]["seconds"] / c[-1]["iteration"] for c in v) for k, v in curves.items()}
    pixel_final = [c[-1] for c in curves["pixel"]]
    target = statistics.fmean(p["accuracy"] for p in pixel_final)
    pixel_seconds = statistics.fmean(p["seconds"] for p in pixel_final)
    lines = [
        header,
        f"\ntarget: pixel DM's validation accuracy after {args.iterations} iterations, {100 * target:.1f} % "
        f"({pixel_seconds:.0f} s of iterations)\n",
        "| row | s / it | iterations to the target | seconds to the target | against pixel's "
        f"{args.iterations} iterations | accuracy there (%) | best accuracy on the curve (%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, points in curves.items():
        reached = first_reaching(points, target)
        averaged = [statistics.fmean(p["accuracy"] for p in c) for c in zip(*points, strict=True)]
        best = f"{100 * max(averaged):.1f}"
        if reached is None:
            lines.append(
                f"| {kind} | {seconds_per_it[kind]:.2f} | not within {len(points[0]) - 1} checkpoints | | | | {best} |"
            )
        else:
            lines.append(
                f"| {kind} | {seconds_per_it[kind]:.2f} | {reached['iteration']} | {reached['seconds']:.0f} | "
                f"{reached['seconds'] / pixel_seconds:.2f}x | {100 * reached['accuracy']:.1f} | {best} |"
            )
    lines.append("\ncurves (seed-averaged accuracy % at iteration):")
    for kind, points in curves.items():
        averaged = [(c[0]["iteration"], statistics.fmean(p["accuracy"] for p in c)) for c in zip(*points, strict=True)]
        lines.append(f"* {kind}: " + ", ".join(f"{i}: {100 * a:.1f}" for i, a in averaged))
        for seed, curve in zip(curve_seeds[kind], points, strict=True):
            lines.append(f"  * seed {seed}: " + ", ".join(f"{100 * p['accuracy']:.1f}" for p in curve))
    text = "\n".join(lines)
    output_file(args.out, ".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
