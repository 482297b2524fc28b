"""Helpers shared by the test files (imported as ``from helpers import ...``; test files never import each other):
synthetic data in the layouts of MedMNIST, CIFAR-10 and ImageNet subsets, the location of the real shared data,
and a bundle run through ``python -m monai.bundle`` with its MLflow store and artefacts in a temporary folder."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from monai.bundle import ConfigWorkflow
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles" / "pathmnist" / "train.yaml"


def write_medmnist_npz(path, n_per_split=None, size=28, channels=3, num_classes=9, seed=0, **overrides):
    """Write a small file with the keys, dtypes and shapes of an official MedMNIST npz.

    Every class appears in every split (labels cycle through the classes). Each image's pixels encode its label
    (mean brightness ``20 * label + noise``), so tests can check that images and labels stay paired.
    ``overrides`` replace arrays by key (e.g. ``train_labels=...``), or drop them when the value is None.
    """
    n_per_split = n_per_split or {"train": 90, "val": 27, "test": 27}
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in n_per_split.items():
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        noise = rng.integers(0, 10, size=shape)
        base = (20 * labels).reshape((n,) + (1,) * (len(shape) - 1))
        arrays[f"{split}_images"] = (base + noise).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def shared_data_dir():
    """Folder of the real development data: ``$MONAI_PLD_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("MONAI_PLD_DATA")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None


def write_cifar(root, per_batch=20, seed=0):
    """The layout of the extracted cifar-10-python.tar.gz: Python-2-style pickles with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in np.arange(per_batch) % 10]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch},
                f,
                protocol=2,
            )
    with open(folder / "batches.meta", "wb") as f:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f, protocol=2)
    return batches


WNIDS = [
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888605",
]  # ImageNette's folders, in ImageNet-id order 0, 217, 482, ...


def write_subset(root, per_class=2):
    """A subset-only folder: train/ and val/ with 10 WordNet-id folders of non-square images; the left half of
    every image is red, the right half has the class's brightness in green."""
    for split in ("train", "val"):
        for k, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for j in range(per_class):
                array = np.zeros((40, 60 + 10 * j, 3), np.uint8)
                array[:, : array.shape[1] // 2, 0] = 255
                array[:, array.shape[1] // 2 :, 1] = 20 * k
                Image.fromarray(array).save(folder / f"img{j}.png")


def run_bundle(tmp_path, data_dir, *overrides, config=TRAIN, check=True, timeout=600):
    """``python -m monai.bundle run`` of ``config`` from the repository root, on the CPU, with the generator cache
    and the MLflow store in ``tmp_path`` (artefacts: ``tmp_path/mlruns``, beside the store); ``overrides`` are
    further ``--key value`` arguments. Raises with the end of both outputs when ``check`` and the run fails."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store below, not the user's
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore"})
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(config),
        "--dataset_dir",
        str(data_dir),
        "--generator_dir",
        str(tmp_path / "generators"),
        "--tracking_uri",
        f"sqlite:///{tmp_path / 'mlruns.db'}",
        "--device",
        "cpu",
        *map(str, overrides),
    ]
    # from the repository root, like a user: the bundles pull the shared workflow in with root-relative macros
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# the smallest useful distillation run through the command line (4 iterations, IPC 2, 2 generator steps)
TINY_CLI = [
    "--iterations",
    4,
    "--ipc",
    2,
    "--batch_real_per_class",
    4,
    "--generator_steps",
    2,
    "--log_interval",
    2,
    "--grid_interval",
    2,
    "--checkpoint_interval",
    2,
    "--eval_epochs",
    2,
]


def checkout_state():
    """What a run could leave in the repository: the names in its root, and git's untracked and ignored entries
    (``git status --porcelain --ignored``; empty outside a git checkout), ``__pycache__`` folders left out."""
    names = {p.name for p in REPO.iterdir()}
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    entries = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and "__pycache__" not in line}
    return names, entries


def new_in_checkout(before):
    """Root names and untracked or ignored entries that appeared since ``before = checkout_state()``."""
    names, entries = checkout_state()
    return sorted((names - before[0]) | (entries - before[1]))


def run_evaluation_bundle(tmp_path, **overrides):
    """Run ``bundles/pathmnist/evaluate.yaml`` in this process from the repository root (as the bundles' macros
    require; the caller chdirs there) on a small PathMNIST-layout file, with its MLflow store in ``tmp_path``.
    ``overrides`` replace or add bundle keys. Returns the output folder."""
    data = tmp_path / "data"
    n_per_split = overrides.pop("n_per_split", {"train": 72, "val": 18, "test": 36})
    write_medmnist_npz(data / "pathmnist.npz", n_per_split=n_per_split)
    settings = {
        "dataset_dir": str(data),
        "download": False,
        "distilled": "random",
        "device": "cpu",
        "output_dir": str(tmp_path / "eval"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        **overrides,
    }
    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundles" / "pathmnist" / "evaluate.yaml"),
        workflow_type="train",
        logging_file=False,
        **settings,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return Path(settings["output_dir"])
