"""How fast a site's own image folder is read: the first (decoding) load and the cached one.

Run: python benchmarks/custom_data_load.py [--npz /work/data/fashionmnist.npz] [--workers 2] [--keep DIR]

Writes the 60,000 train + val images of the Fashion-MNIST npz as 28 px grey PNGs into a temporary image folder
(one subfolder per class), then reads it through ``load_dataset("custom", "train", folder, image_size=28)`` twice,
each time in a fresh process: the first load lists, decodes (DataLoader workers) and caches the folder and writes
the split file; the second finds the cache. Reports wall time, images per second, peak RSS of the process and of
its DataLoader workers, and the load average (other work on the machine slows both loads).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_folder(npz: Path, root: Path) -> tuple[int, float]:
    """The npz's train and val images as PNGs under ``root/<class>/``; returns the count and the seconds taken."""
    from PIL import Image

    start = time.perf_counter()
    with np.load(npz, allow_pickle=False) as data:
        images = np.concatenate([data["train_images"], data["val_images"]])
        labels = np.concatenate([data["train_labels"], data["val_labels"]]).reshape(-1)
        names = [str(n).replace("/", "_") for n in data["class_names"]]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / names[label] / f"{i:05d}.png")
    return len(images), time.perf_counter() - start


def load_once(folder: str, cache: str, workers: int) -> dict:
    """One ``load_dataset`` call (run in a child process, so its peak RSS is its own)."""
    from monai_pld.data import load_dataset

    start = time.perf_counter()
    data = load_dataset(
        "custom", "train", folder, image_size=28, data_options={"cache_dir": cache, "num_workers": workers}
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "train_images": len(data),
        "listed": data.source_info["images"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", default="/work/data/fashionmnist.npz")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", default=None, help="write the folder here and keep it (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "CACHE", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.child[0], args.child[1], int(args.child[2]))))
        return

    with tempfile.TemporaryDirectory(prefix="custom_data_load_") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "fashion"
        cache = str(Path(tmp) / "cache")
        n, write_s = write_folder(Path(args.npz), root)
        print(f"wrote {n} PNGs to {root} in {write_s:.1f} s")
        rows = {}
        for phase in ("first", "cached"):
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--child", str(root), cache, str(args.workers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[phase] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "loadavg_1min_before": load}
            row = rows[phase]
            print(
                f"{phase:>6} load: {row['seconds']:.2f} s, {row['listed'] / row['seconds']:.0f} images/s, "
                f"{row['train_images']} training images, peak RSS {row['peak_rss_mib']:.0f} MiB "
                f"(workers {row['workers_peak_rss_mib']:.0f} MiB), load average before {load:.2f}"
            )
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "images": n,
                "workers": args.workers,
                "write_seconds": write_s,
                **rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
