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
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections import defaultdict
from pathlib import Path


def space_of(spec: str) -> tuple[str, float] | None:
    """``latent:L2:lr=0.03`` -> ``("feature", 0.03)``; rows without an explicit learning rate are skipped."""
    kind, *options = spec.split(":")
    if kind not in ("pixel", "latent", "slfd"):
        return None
    lr = next((float(o[3:]) for o in options if o.startswith("lr=")), None)
    if lr is None:
        return None
    layer = any(o.startswith("L") and o[1:] != "0" for o in options)
    return ("pixel" if kind == "pixel" else "feature" if layer else "latent"), lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="latent_prior.py .json files of validation-split runs")
    parser.add_argument("--out", default="docs/tuning/learning_rates.json")
    args = parser.parse_args()
    # validation accuracy of every row, per (dataset, matcher); several files of one dataset are merged
    by_dataset: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    sources = []
    for path in args.results:
        data = json.loads(Path(path).read_text())
        run = data["args"]
        if run["split"] != "val":
            raise SystemExit(f"{path} was tested on the {run['split']!r} split: choose defaults on 'val' only")
        accuracy = {
            row["row"]: statistics.fmean(r["accuracy"] for r in row["results"])
            for row in data["rows"]
            if row["results"]
        }
        by_dataset[(f"{run['dataset']} {run['data_dir']}", run["matcher"])].update(accuracy)
        sources.append(
            {"file": str(path), "dataset": run["dataset"], "header": data.get("header"), "val_accuracy": accuracy}
        )
    # (space, matcher) -> lr -> [accuracy relative to the dataset's best row, one per dataset]
    scores: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_, matcher), accuracy in by_dataset.items():
        best = max(accuracy.values())
        for spec, acc in accuracy.items():
            parsed = space_of(spec)
            if parsed is not None:
                scores[(parsed[0], matcher)][parsed[1]].append(acc - best)
    chosen = []
    for (space, matcher), by_lr in sorted(scores.items()):
        mean = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        lr = max(mean, key=mean.get)
        chosen.append(
            {
                "space": space,
                "matcher": matcher,
                "lr_codes": lr,
                "grid": {
                    str(k): {"relative_val_accuracy": round(mean[k], 4), "datasets": len(by_lr[k])}
                    for k in sorted(mean)
                },
            }
        )
        print(f"{space:8s} {matcher}: lr_codes {lr}  (mean val accuracy relative to the best row: {mean})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"date": str(datetime.date.today()), "chosen": chosen, "sources": sources}, indent=2) + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
