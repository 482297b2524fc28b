"""Choose the default learning rate of every parameterisation space from validation-split results.

Run the grid with ``benchmarks/latent_prior.py --split val`` (one results file per dataset), e.g.

    python benchmarks/latent_prior.py --dataset retinamnist --data-dir ../shared/data --split val \
        --rows pixel:lr=0.003 pixel:lr=0.01 pixel:lr=0.03 latent:lr=0.03 latent:lr=0.1 latent:lr=0.3 \
               latent:L2:lr=0.01 latent:L2:lr=0.03 latent:L2:lr=0.1 --backbones convnet --epochs 150 \
        --out docs/tuning/retinamnist_val

then choose:

    python benchmarks/select_learning_rates.py docs/tuning/retinamnist_val.json docs/tuning/fashionmnist_val.json \
        --out docs/tuning/learning_rates.json

For each space (``pixel``, ``latent`` = the generator's bottleneck, ``feature`` = a decoder feature map) and matcher,
the learning rate with the highest validation accuracy averaged over the datasets (each dataset's accuracies taken
relative to its best row, so that an easy dataset does not outvote a hard one) is chosen. Results on a test split
are refused: defaults must never be tuned on test data. ``monai_pld/defaults.py`` holds the chosen values and a test
checks that it matches the committed output.

Rows at IPC 1 form groups of their own, one per parameterisation (``latent`` codes and ``slfd`` apart), since one
slot per class changes what a step does; among their learning rates only those measured on every dataset of the
group compete. A row run without ``lr=`` took ``lr_codes: auto``: files that record the value it resolved to
(``lr_codes`` of the row) give it; older ones ran before the IPC 1 defaults, when ``auto`` meant the many-image
value of the space, which this script chooses first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections import defaultdict
from pathlib import Path


def space_of(spec: str) -> tuple[str, str, float | None] | None:
    """``latent:L2:lr=0.03`` -> ``("latent", "feature", 0.03)``: kind, space and the explicit learning rate (``None``
    without one); ``None`` for the real-image baselines."""
    kind, *options = spec.split(":")
    if kind not in ("pixel", "latent", "slfd"):
        return None
    lr = next((float(o[3:]) for o in options if o.startswith("lr=")), None)
    layer = any(o.startswith("L") and o[1:] != "0" for o in options)
    return kind, ("pixel" if kind == "pixel" else "feature" if layer else "latent"), lr


def choose(by_lr: dict[float, list[float]], datasets: int | None = None) -> dict:
    """The learning rate of the highest mean relative accuracy (among those measured on ``datasets`` datasets,
    when given), and the grid of every mean."""
    mean = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
    eligible = [lr for lr in mean if datasets is None or len(by_lr[lr]) == datasets]
    return {
        "lr_codes": max(eligible, key=mean.get),
        "grid": {str(k): {"relative_val_accuracy": round(mean[k], 4), "datasets": len(by_lr[k])} for k in sorted(mean)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="latent_prior.py .json files of validation-split runs")
    parser.add_argument("--out", default="docs/tuning/learning_rates.json")
    args = parser.parse_args()
    # validation accuracies of every (row, ipc), per (dataset, matcher): files of one dataset (e.g. one per seed)
    # are pooled, each row's mean taken over all their classifiers
    pooled: dict[tuple[str, str], dict[tuple[str, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    recorded_lr: dict[tuple[str, str], dict[tuple[str, int], float]] = defaultdict(dict)
    sources = []
    for path in args.results:
        data = json.loads(Path(path).read_text())
        run = data["args"]
        if run["split"] != "val":
            raise SystemExit(f"{path} was tested on the {run['split']!r} split: choose defaults on 'val' only")
        # a dataset is its name and its file or folder name: the same file read from another place is the same data
        key = (f"{run['dataset']} {Path(str(run['data_dir'])).name}", run["matcher"])
        accuracy = {}
        for row in data["rows"]:
            if not row["results"]:
                continue
            name = (row["row"], int(row["ipc"]))
            pooled[key][name] += [r["accuracy"] for r in row["results"]]
            if row.get("lr_codes") is not None:
                recorded_lr[key][name] = float(row["lr_codes"])
            label = row["row"] if name[1] == 10 else f"{row['row']} ipc {name[1]}"
            accuracy[label] = statistics.fmean(r["accuracy"] for r in row["results"])
        sources.append(
            {"file": str(path), "dataset": run["dataset"], "header": data.get("header"), "val_accuracy": accuracy}
        )
    by_dataset = {
        key: {name: (statistics.fmean(v), recorded_lr[key].get(name)) for name, v in rows.items()}
        for key, rows in pooled.items()
    }
    # group -> lr -> [accuracy relative to the dataset's best row of the same IPC, one per dataset]
    # groups: (space, matcher) for IPC > 1 (every latent kind together), (kind, space, matcher) at IPC 1
    many: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    one: dict[tuple[str, str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    datasets_at_one: dict[tuple[str, str, str], set] = defaultdict(set)
    for (dataset, matcher), accuracy in by_dataset.items():
        best = {ipc: max(acc for (_, i), (acc, _) in accuracy.items() if i == ipc) for _, ipc in accuracy}
        for (spec, ipc), (acc, recorded) in accuracy.items():
            parsed = space_of(spec)
            if parsed is None or ipc == 1:
                continue
            kind, space, lr = parsed
            lr = lr if lr is not None else recorded  # rows of older files without lr= are left out
            if lr is not None:
                many[(space, matcher)][lr].append(acc - best[ipc])
        for (spec, ipc), (acc, recorded) in accuracy.items():
            parsed = space_of(spec)
            if parsed is None or ipc != 1:
                continue
            kind, space, lr = parsed
            lr = lr if lr is not None else recorded
            if lr is None:  # ran with "auto" before the IPC 1 defaults: the many-image choice of its space
                lr = choose(many[(space, matcher)])["lr_codes"] if many.get((space, matcher)) else None
            if lr is not None:
                one[(kind, space, matcher)][lr].append(acc - best[ipc])
                datasets_at_one[(kind, space, matcher)].add(dataset)
    chosen = [{"space": space, "matcher": matcher, **choose(by_lr)} for (space, matcher), by_lr in sorted(many.items())]
    chosen += [
        {
            "ipc": 1,
            "parameterization": kind,
            "space": space,
            "matcher": matcher,
            **choose(by_lr, len(datasets_at_one[key])),
        }
        for key, by_lr in sorted(one.items())
        for kind, space, matcher in [key]
    ]
    for entry in chosen:
        at = f"ipc 1 {entry['parameterization']} " if entry.get("ipc") == 1 else ""
        print(f"{at}{entry['space']} {entry['matcher']}: lr_codes {entry['lr_codes']}  (grid: {entry['grid']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"date": str(datetime.date.today()), "chosen": chosen, "sources": sources}, indent=2) + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
