"""Helpers shared by the test files (imported as ``from helpers import ...``; test files never import each other):
synthetic data in the layouts of MedMNIST, CIFAR-10 and ImageNet subsets, the location of the real shared data,
and a bundle run through ``python -m monai.bundle`` with its MLflow store and artefacts in a temporary folder."""

import ast
import contextlib
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


def run_bundle(tmp_path, data_dir, *overrides, config=TRAIN, check=True, timeout=600, ranks=None):
    """``python -m monai.bundle run`` of ``config`` from the repository root, on the CPU, with the generator cache
    and the MLflow store in ``tmp_path`` (artefacts: ``tmp_path/mlruns``, beside the store); ``overrides`` are
    further ``--key value`` arguments; ``ranks``: started by ``torchrun`` with that many processes on this node
    (one thread each). Raises with the end of both outputs when ``check`` and the run fails."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store below, not the user's
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore"})
    launcher = []
    if ranks:
        env["OMP_NUM_THREADS"] = "1"
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd = [
        sys.executable,
        *launcher,
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


def run_bundle_here(tmp_path, data_dir, *overrides, config=TRAIN, tracking=None):
    """The same run as :func:`run_bundle` (same settings, ``overrides`` as ``--key value`` pairs), but through
    MONAI's ``ConfigWorkflow`` in this process, from the repository root: the bundle without the command line's
    start-up (``import monai`` alone takes 5-10 s here). For tests of what a run does, not of what the command line
    prints. ``tracking``: MONAI's tracking option (``"mlflow"``), as ``--tracking`` on the command line."""
    pairs = list(overrides)
    if len(pairs) % 2 or not all(str(k).startswith("--") for k in pairs[::2]):
        raise ValueError(f"overrides must be --key value pairs, got {pairs}")
    settings = {
        "dataset_dir": str(data_dir),
        "generator_dir": str(tmp_path / "generators"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "device": "cpu",
    }
    # the command line hands every value to the bundle parsed as Python literals (fire); so does this
    settings.update({str(k)[2:]: _literal(v) for k, v in zip(pairs[::2], pairs[1::2], strict=True)})
    run_workflow(config, tracking=tracking, **settings)


def run_workflow(config, tracking=None, **settings):
    """MONAI's ``ConfigWorkflow`` of ``config`` with ``settings`` as overrides, initialised, run and finalised in
    this process from the repository root (the bundles pull the shared workflow in with root-relative macros)."""
    with contextlib.chdir(REPO):
        workflow = ConfigWorkflow(
            config_file=str(config), workflow_type="train", logging_file=False, tracking=tracking, **settings
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()


def _literal(value):
    if not isinstance(value, str):
        return str(value) if isinstance(value, Path) else value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


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
    """Run ``bundles/pathmnist/evaluate.yaml`` in this process from the repository root (:func:`run_workflow`) on a
    small PathMNIST-layout file, with its MLflow store in ``tmp_path``.
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
    run_workflow(REPO / "bundles" / "pathmnist" / "evaluate.yaml", **settings)
    return Path(settings["output_dir"])


def free_port():
    """A TCP port nobody listens on now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args):
    """Body of one spawned rank: the environment ``torchrun`` would set, one thread, then ``fn(*args)``."""
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    torch.set_num_threads(1)
    from monai_pld import distributed

    distributed.init_distributed("cpu")
    try:
        fn(*args)
    finally:
        distributed.shutdown()


def run_ranks(world, fn, *args, timeout=300):
    """Run ``fn(*args)`` in ``world`` spawned processes joined by a gloo group, as ``torchrun`` would; a failure in
    any rank raises ``torch.multiprocessing.ProcessRaisedException`` with that rank's traceback. ``fn`` must be a
    module-level function of an importable module (e.g. this one)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _rank_main, args=(world, free_port(), fn, args), nprocs=world, join=False, start_method="spawn"
    )
    import time

    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish in {timeout} s")
    finally:  # a failure, a timeout or an interrupted test run leaves no rank behind
        for p in context.processes:
            if p.is_alive():
                p.kill()


def distil_tiny(
    data_dir,
    out=None,
    kind="pixel",
    matcher="dm",
    iterations=3,
    optimizer="adam",
    generator_path=None,
    kl_weight=0.0,
    checkpoint_dir=None,
    resume=False,
    die_at=None,
    fail_at=None,
    dm_args=None,
):
    """A few distillation iterations on the small PathMNIST-layout file in ``data_dir``; rank 0 saves the learnt
    state and the last output to ``out`` (a ``.pt`` file). Rank 1 exits abruptly at iteration ``die_at`` (a killed
    process) or raises at iteration ``fail_at`` (an error on one rank)."""
    import torch
    from ignite.engine import Events

    from monai_pld import distributed
    from monai_pld.data import load_dataset
    from monai_pld.workflows import build_trainer

    data = load_dataset("pathmnist", "train", data_dir, download=False)
    trainer = build_trainer(
        data,
        kind,
        matcher,
        ipc=2,
        iterations=iterations,
        generator_path=generator_path,
        generator_policy="any",
        rank=2,
        samples_per_slot=2,
        batch_real_per_class=4,
        kl_weight=kl_weight,
        optimizer=optimizer,
        seed=0,
        device="cpu",
        matcher_args={"embedder_kwargs": {"width": 16}, **(dm_args or {})} if matcher == "dm" else {"loops": [2, 1]},
        checkpoint_dir=checkpoint_dir,
        checkpoint_interval=1,
        resume=resume,
    )
    if distributed.rank() == 1 and die_at is not None:
        trainer.add_event_handler(Events.ITERATION_STARTED(once=die_at), lambda: os._exit(3))
    if distributed.rank() == 1 and fail_at is not None:

        def fail():
            raise ValueError("this rank's real images are unreadable")

        trainer.add_event_handler(Events.ITERATION_STARTED(once=fail_at), fail)
    trainer.run()
    if distributed.is_main() and out is not None:
        state = {k: v.detach().clone() for k, v in trainer.parameterization.state_dict().items()}
        torch.save(
            {
                "state": state,
                "output": trainer.state.output[0],
                "split": trainer.class_split,
                "classes": trainer.own_classes,
            },
            out,
        )
    return trainer


def distributed_scenarios(data_dir, out_dir, generator_path):
    """Everything that is split among ranks, each on tiny data; rank 0 saves what each produced under ``out_dir``
    (run in one process, and under several ranks, to compare the two)."""
    import torch

    from monai_pld import distributed
    from monai_pld.data import load_dataset
    from monai_pld.engines.experts import train_experts
    from monai_pld.engines.generator import pretrain_generator
    from monai_pld.evaluation import evaluate_image_set, load_image_source

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distil_tiny(data_dir, out / "dm_pixel.pt", "pixel", "dm")
    distil_tiny(data_dir, out / "dm_pixel_std.pt", "pixel", "dm", dm_args={"std_weight": 1.0})
    distil_tiny(data_dir, out / "dm_pixel_mmd.pt", "pixel", "dm", dm_args={"kernel": "gaussian"})
    # kl_weight 0.01 (and 0.1, once the means and samples shared one pass of the slot network) put one activation of
    # this tiny run within rounding of a non-smooth point at its last iteration, where two summation orders of the
    # same step part by 1e-4 (1e-7 the step before): a weight away from that coincidence
    distil_tiny(
        data_dir, out / "dm_slfd.pt", "slfd", "dm", optimizer="sgd", generator_path=generator_path, kl_weight=0.2
    )
    distil_tiny(data_dir, out / "dc_pixel.pt", "pixel", "dc", iterations=4)
    train = load_dataset("pathmnist", "train", data_dir, download=False)
    test = load_dataset("pathmnist", "test", data_dir, download=False)
    source = load_image_source("random", train, ipc=2, seed=0)
    evaluate_image_set(
        source, train, test, out / "evaluation", backbones=["convnet", "alexnet"], runs=2, epochs=2, device="cpu"
    )
    train_experts(
        train, out / "experts", num_experts=3, epochs=1, batch_size=16, model_kwargs={"width": 8}, device="cpu"
    )
    generator = pretrain_generator(
        out / "generator.pt",
        "pathmnist",
        data_dir,
        download=False,
        steps=3,
        batch_size=9,  # shares of 5 and 4 images under 2 ranks
        device="cpu",
        val_interval=3,
        log_interval=1,
    )
    if distributed.is_main():
        torch.save({k: v.clone() for k, v in generator.state_dict().items()}, out / "generator_state.pt")
