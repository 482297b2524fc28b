"""Write a file of PathMNIST's exact layout and size (89,996 / 10,004 / 7,180 RGB images of 28 x 28, 9 classes) with
synthetic content, for timing the PathMNIST bundle where PathMNIST cannot be downloaded. Every step of a run does
the same work on it as on the real file; only the images (class-coloured fields with uniform noise, numpy seed 0)
differ, so quality figures from it mean nothing.

    python benchmarks/pathmnist_shaped_npz.py /tmp/pathmnist_shaped
    python -m monai.bundle run --config_file bundles/pathmnist/train.yaml \\
        --dataset_dir /tmp/pathmnist_shaped --download false
"""

import argparse
from pathlib import Path

import numpy as np

SPLITS = {"train": 89996, "val": 10004, "test": 7180}  # PathMNIST's split sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where pathmnist.npz is written")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    colours = (np.arange(9)[:, None] * np.array([23, 57, 91])[None, :] % 256).astype(np.int16)
    arrays = {}
    for split, n in SPLITS.items():
        labels = rng.integers(0, 9, (n, 1)).astype(np.uint8)
        images = colours[labels[:, 0]][:, None, None, :] + rng.integers(-40, 40, (n, 28, 28, 3))
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    args.folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.folder / "pathmnist.npz", **arrays)
    print(f"wrote {args.folder / 'pathmnist.npz'}")


if __name__ == "__main__":
    main()
