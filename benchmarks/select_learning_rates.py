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

SLFD's network (its mean, variance and factor heads) has a learning rate of its own, ``lr_network``: rows
``slfd[:L<layer>]:net=<rate>`` compete with the plain ``slfd[:L<layer>]`` row (which ran with the rate it records,
or, in files written before rows recorded it, with ``monai_pld.defaults.UNSELECTED_NETWORK_RATE``, the only value
``auto`` had then), per space and matcher, among the rates measured on every dataset of the group. Only rows that
vary nothing but the learning rate take part in either choice (a row with ``s=``, ``kl=``, ``v=``... is an
ablation, not a point of the grid).

Results of different budgets (DM iterations, real images per class) are never compared with each other: each
budget is a selection of its own, and every chosen entry names its ``iterations`` and ``batch_real``.
``lr_network: auto`` takes the network rate of the largest selected budget not above a run's iterations
(``monai_pld.defaults.NETWORK_RATES_BY_ITERATIONS``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections import defaultdict
from pathlib import Path

from monai_pld.defaults import UNSELECTED_NETWORK_RATE


def space_of(spec: str, rate: str = "lr=") -> tuple[str, str, float | None] | None:
    """``latent:L2:lr=0.03`` -> ``("latent", "feature", 0.03)``: kind, space and the explicit learning rate named by
    ``rate`` (``lr=`` for the codes, ``net=`` for SLFD's network; ``None`` without one); ``None`` for the real-image
    baselines and for rows that set anything but the layer and that rate."""
    kind, *options = spec.split(":")
    if kind not in ("pixel", "latent", "slfd"):
        return None
    if any(not (o.startswith("L") or o.startswith(rate)) for o in options):
        return None
    lr = next((float(o[len(rate) :]) for o in options if o.startswith(rate)), None)
    layer = any(o.startswith("L") and o[1:] != "0" for o in options)
    return kind, ("pixel" if kind == "pixel" else "feature" if layer else "latent"), lr


def choose(by_lr: dict[float, list[float]], datasets: int | None = None, key: str = "lr_codes") -> dict:
    """The learning rate of the highest mean relative accuracy (among those measured on ``datasets`` datasets,
    when given), and the grid of every mean."""
    mean = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
    eligible = [lr for lr in mean if datasets is None or len(by_lr[lr]) == datasets]
    return {
        key: max(eligible, key=mean.get),
        "grid": {str(k): {"relative_val_accuracy": round(mean[k], 4), "datasets": len(by_lr[k])} for k in sorted(mean)},
    }


def select(files: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    """The chosen learning rates of the results of one budget (``(path, results)`` pairs), and the sources."""
    # validation accuracies of every (row, ipc), per (dataset, matcher): files of one dataset (e.g. one per seed)
    # are pooled, each row's mean taken over all their classifiers
    pooled: dict[tuple[str, str], dict[tuple[str, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    recorded_lr: dict[tuple[str, str], dict[tuple[str, int], float]] = defaultdict(dict)
    recorded_net: dict[tuple[str, str], dict[tuple[str, int], float]] = defaultdict(dict)
    sources = []
    for path, data in files:
        run = data["args"]
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
            if row.get("lr_network") is not None:
                recorded_net[key][name] = float(row["lr_network"])
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
    # SLFD's network rate at IPC > 1: (space, matcher) -> rate -> relative accuracies, one per dataset
    network: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    datasets_of_network: dict[tuple[str, str], set] = defaultdict(set)
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
        for (spec, ipc), (acc, _) in accuracy.items():  # SLFD's network rate, IPC > 1
            parsed = space_of(spec, "net=")
            if parsed is None or parsed[0] != "slfd" or ipc == 1:
                continue
            _, space, net = parsed
            net = net if net is not None else recorded_net[(dataset, matcher)].get((spec, ipc), UNSELECTED_NETWORK_RATE)
            network[(space, matcher)][net].append(acc - best[ipc])
            datasets_of_network[(space, matcher)].add(dataset)
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
        {"parameterization": "slfd", "space": space, "matcher": matcher}
        | choose(by_lr, len(datasets_of_network[(space, matcher)]), key="lr_network")
        for (space, matcher), by_lr in sorted(network.items())
        if len(by_lr) > 1  # a choice needs a grid: one rate alone is only the default it ran with
    ]
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
    return chosen, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="latent_prior.py .json files of validation-split runs")
    parser.add_argument("--out", default="docs/tuning/learning_rates.json")
    args = parser.parse_args()
    budgets: dict[tuple[int, int | None], list[tuple[str, dict]]] = defaultdict(list)
    for path in args.results:
        data = json.loads(Path(path).read_text())
        run = data["args"]
        if run["split"] != "val":
            raise SystemExit(f"{path} was tested on the {run['split']!r} split: choose defaults on 'val' only")
        budgets[(int(run["iterations"]), run.get("batch_real"))].append((str(path), data))
    chosen, sources = [], []
    for (iterations, batch_real), files in sorted(budgets.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        budget = {"iterations": iterations, "batch_real": batch_real}
        chosen_here, sources_here = select(files)
        chosen += [entry | budget for entry in chosen_here]
        sources += [source | budget for source in sources_here]
    for entry in chosen:
        at = f"ipc 1 {entry['parameterization']} " if entry.get("ipc") == 1 else ""
        rate = "lr_network" if "lr_network" in entry else "lr_codes"
        at += "slfd network " if rate == "lr_network" else ""
        print(
            f"{entry['iterations']} iterations, {at}{entry['space']} {entry['matcher']}: {rate} {entry[rate]}"
            f"  (grid: {entry['grid']})"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"date": str(datetime.date.today()), "chosen": chosen, "sources": sources}, indent=2) + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
