"""Write a small archive: ``--n`` training images drawn at random (numpy seed ``--seed``, without replacement, in
their original order; the class proportions are those of the draw, as in a real small archive) from a
MedMNIST-layout npz, with its validation and test splits unchanged. ``--complement`` writes the training images the
same draw leaves out instead: a second archive of the same modality with no image in common with the first (another
site's images, e.g. to pretrain a generator the first site did not train).

    python benchmarks/small_archive_npz.py ../shared/data/retinamnist.npz /tmp/retina600.npz --n 600
    python benchmarks/small_archive_npz.py ../shared/data/retinamnist.npz /tmp/retina_other480.npz --n 600 --complement
    python benchmarks/latent_prior.py --dataset custom --data-dir /tmp/retina600.npz --split test ...
"""

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an npz in the MedMNIST layout")
    parser.add_argument("out", type=Path, help="the npz to write")
    parser.add_argument("--n", type=int, default=600, help="training images to keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--complement", action="store_true", help="write the training images the draw leaves out")
    args = parser.parse_args()
    with np.load(args.source) as data:
        arrays = {key: data[key] for key in data.files}
    total = len(arrays["train_images"])
    if not 0 < args.n <= total:
        raise SystemExit(f"--n must be between 1 and the {total} training images of {args.source}, got {args.n}")
    keep = np.sort(np.random.default_rng(args.seed).choice(total, args.n, replace=False))
    if args.complement:
        if args.n == total:
            raise SystemExit(f"--complement of all {total} training images is empty; give a smaller --n")
        keep = np.setdiff1d(np.arange(total), keep)
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    counts = np.bincount(arrays["train_labels"].ravel())
    what = f"the {len(keep)} training images not among the {args.n} drawn" if args.complement else f"{args.n}"
    print(f"wrote {args.out}: {what} of {total} training images, per class {counts.tolist()}")


if __name__ == "__main__":
    main()
