"""Cross-architecture evaluation: train classifiers from scratch on an image set, test them on the real test split.

Every row of a comparison is an image set: a distilled ``images.npz``, a ``distribution.pt`` rendered through its
generator (``mean``, one fixed ``sample``, or ``resample``: fresh samples every epoch), or the ``random`` / ``full``
real-image baselines. Training uses MONAI's ``SupervisedTrainer`` (per-sample DSA, SGD with momentum) and testing
MONAI's ``SupervisedEvaluator``; metrics come from scikit-learn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch.utils.data import DataLoader, TensorDataset

from monai_pld import distributed
from monai_pld.augment import DiffSiameseAugment
from monai_pld.data import ImageSet
from monai_pld.handlers.progress import format_duration
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import atomic_save_json, atomic_write, derive_seed, resolve_device

__all__ = [
    "PROTOCOLS",
    "check_evaluation_config",
    "default_evaluation_dir",
    "ImageSource",
    "classification_metrics",
    "evaluate_image_set",
    "load_image_source",
    "summarise",
    "train_and_test",
    "train_classifier",
]

logger = logging.getLogger("monai_pld")

PROTOCOLS = ("dc", "glad")
# per-architecture learning rates of the GLaD-style protocol (VGG-11 trains at a tenth of the others)
GLAD_LR = {"vgg11": 1e-4}
GLAD_DEFAULT_LR = 1e-3
DC_LR = 0.01
EVAL_MODES = ("mean", "sample", "resample")


class ImageSource:
    """The images a classifier trains on: a fixed set, or a distribution that is resampled every epoch.

    Args:
        images: float images ``(N, C, H, W)`` in ``[0, 1]`` (the first draw, for ``resample``).
        labels: int64 labels ``(N,)``.
        description: what the set is (recorded in the results).
        resample: optional ``f(epoch) -> (images, labels)`` giving a fresh draw for each epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        description: dict[str, Any],
        resample: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.images, self.labels = images.float(), labels.long()
        self.description = description
        self.resample = resample

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resample(epoch) if self.resample is not None else (self.images, self.labels)

    @classmethod
    def from_distribution(
        cls, distribution: Any, generator: Any, description: dict[str, Any], mode: str = "mean", seed: int = 0
    ) -> ImageSource:
        """Images rendered from a distilled distribution: its means, one draw seeded by ``seed`` (``sample``), or a
        fresh draw seeded by ``(seed, epoch)`` every epoch (``resample``)."""
        if mode not in EVAL_MODES:
            raise ValueError(f"'mode' must be one of {list(EVAL_MODES)}, got {mode!r}")

        def draw(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = distribution.render(generator, "sample", seed=derive_seed(seed, epoch))
            return x.cpu(), y.cpu()

        images, labels = distribution.render(generator, "sample" if mode != "mean" else "mean", seed=seed)
        return cls(images.cpu(), labels.cpu(), description, draw if mode == "resample" else None)


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
            names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else []
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable images.npz with 'images' and 'labels' ({e})") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    return x, torch.from_numpy(labels.astype(np.int64)), names


def load_image_source(
    distilled: str | os.PathLike,
    train: ImageSet,
    ipc: int = 10,
    seed: int = 0,
    mode: str = "mean",
    generator_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> ImageSource:
    """The image set named by ``distilled``.

    Args:
        distilled: ``random`` (``ipc`` seeded real images per class, the same choice that initialises distillation),
            ``full`` (the training split), a run folder (``<run>`` or ``<run>/distilled``), an ``images.npz``, a
            ``distribution.pt``, or a shared package (folder or ``.zip``, verified by
            :func:`monai_pld.export.load_distilled`).
        train: the real training split (baselines, and the class count and image shape to check against).
        ipc: images per class of ``random``.
        seed: seed of ``random`` and of sampled distributions.
        mode: for a distribution: ``mean`` (the images of ``images.npz``), ``sample`` (one fixed-seed sample) or
            ``resample`` (fresh samples every epoch).
        generator_path: generator of a distribution (default: the one recorded in its manifest).
        device: where the generator renders.

    Raises:
        ValueError: unknown mode, an unreadable set, or one whose classes or image shape do not match ``train``
            (``PackageError``, a ``ValueError``, for a package that fails verification).
    """
    from monai_pld.builders import load_distribution, select_initial_indices

    if mode not in EVAL_MODES:
        raise ValueError(f"'mode' must be one of {list(EVAL_MODES)}, got {mode!r}")
    if str(distilled) == "random":
        order, labels = select_initial_indices(train, ipc, seed)
        return ImageSource(train.float_images(order), labels, {"kind": "random", "ipc": ipc, "seed": seed})
    if str(distilled) == "full":
        return ImageSource(train.float_images(), train.labels, {"kind": "full", "images": len(train)})
    path = Path(distilled)
    from monai_pld.export import is_package, load_distilled

    if is_package(path):  # verified (manifest, checksums, labels) before anything is parsed
        package = load_distilled(path, map_location=resolve_device(device), load_generator=mode != "mean")
        source = package.image_source(mode, seed)
        _check_against(source, train, path)
        return source
    if path.is_dir():
        path = path / "distilled" if (path / "distilled").is_dir() else path
        wants_distribution = mode != "mean" and (path / "distribution.pt").is_file()
        path = path / ("distribution.pt" if wants_distribution else "images.npz")
    if not path.is_file():
        raise ValueError(
            f"no image set at {path}; give a run folder, an images.npz, a distribution.pt, 'random' or 'full'"
        )
    description: dict[str, Any] = {"kind": "file", "path": str(path), "mode": mode}
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest:
        description["manifest"] = {k: manifest.get(k) for k in ("ipc", "parameterization", "matcher", "config")}
    if path.suffix == ".npz":
        images, labels, _ = _read_npz(path)
        source = ImageSource(images, labels, description)
    else:
        generator_file = generator_path or (manifest.get("generator") or {}).get("path")
        if not generator_file:
            raise ValueError(f"{path}: give generator_path (the manifest names no generator)")
        from monai_pld.networks.generators import load_generator

        dev = resolve_device(device)
        param = load_distribution(path, map_location=dev)
        generator = load_generator(
            generator_file, map_location=dev, latent_layer=param.hyper_parameters.get("latent_layer", 0)
        )
        source = ImageSource.from_distribution(param, generator, description, mode, seed)
    _check_against(source, train, path)
    return source


def _check_against(source: ImageSource, train: ImageSet, path: Path) -> None:
    shape = (train.channels, train.image_size, train.image_size)
    if tuple(source.images.shape[1:]) != shape:
        raise ValueError(
            f"{path} holds images of shape {tuple(source.images.shape[1:])} but the test data are {shape}; evaluate it "
            "with the dataset_flag and image_size it was distilled from"
        )
    if source.labels.numel() and int(source.labels.max()) >= train.num_classes:
        raise ValueError(
            f"{path} has labels up to {int(source.labels.max())} but the data have {train.num_classes} classes; "
            "evaluate it with the dataset it was distilled from"
        )


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro one-vs-rest AUC, macro F1 and per-class accuracy (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

    predictions = probabilities.argmax(1)
    present = np.unique(labels)
    try:
        if num_classes == 2:
            auc = float(roc_auc_score(labels, probabilities[:, 1]))
        elif len(present) == num_classes:
            auc = float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
        else:  # classes missing from the test labels: score the present ones, renormalised as sklearn requires
            scores = probabilities[:, present] / probabilities[:, present].sum(1, keepdims=True)
            auc = float(roc_auc_score(labels, scores, multi_class="ovr", average="macro", labels=present))
    except ValueError:  # a single class in the test labels: AUC is undefined
        auc = float("nan")
    per_class = recall_score(labels, predictions, labels=list(range(num_classes)), average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "auc": auc,
        "f1": float(f1_score(labels, predictions, labels=list(range(num_classes)), average="macro", zero_division=0)),
        "per_class_accuracy": [float(v) for v in per_class],
    }


def _lr_lambda(protocol: str, epochs: int) -> Callable[[int], float]:
    if protocol == "dc":  # x0.1 from half-way, as the reference
        return lambda epoch: 1.0 if epoch < epochs // 2 else 0.1
    warm = max(epochs // 2, 1)

    def glad(epoch: int) -> float:  # linear warm-up over half the epochs, then cosine over the other half
        if epoch < warm:
            return 1e-7 + (1 - 1e-7) * epoch / warm
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(epochs - warm, 1)))

    return glad


def train_classifier(
    backbone: str,
    source: ImageSource,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    protocol: str = "dc",
    epochs: int = 300,
    batch_size: int = 256,
    lr: float | None = None,
    dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``backbone`` from scratch on ``source`` with MONAI's ``SupervisedTrainer``.

    Protocols: ``dc`` (SGD momentum 0.9, weight decay 5e-4, lr 0.01, x0.1 at half) and ``glad`` (same optimiser,
    lr 1e-3 (VGG-11 1e-4), linear warm-up over half the epochs then cosine, weights averaged by an EMA of decay
    0.995 updated every epoch, the EMA model returned). Both train with per-sample DSA.

    Returns:
        the trained network (in eval mode, on ``device``; inputs normalised with ``mean``/``std``) and
        ``{"train_seconds", "lr", "epochs"}``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"'protocol' must be one of {list(PROTOCOLS)}, got {protocol!r}")
    dev = resolve_device(device)
    channels, size = int(source.images.shape[1]), int(source.images.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(seed, 0))
        net = get_classifier(backbone, channels, num_classes, size)
    net = net.to(dev)
    lr = lr if lr is not None else (DC_LR if protocol == "dc" else GLAD_LR.get(backbone, GLAD_DEFAULT_LR))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(protocol, epochs))
    augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
    mean_t = torch.tensor(list(mean), device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=dev).view(1, -1, 1, 1)
    counter = {"batches": 0}

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):  # noqa: ARG001 - MONAI's signature
        images, labels = batch
        x = (images.to(dev) - mean_t) / std_t
        counter["batches"] += 1
        if augment is not None:
            x = augment(x, derive_seed(seed, 1, counter["batches"]))
        return x, labels.to(dev)

    def loader_for(epoch: int) -> DataLoader:
        images, labels = source.epoch(epoch)
        return DataLoader(
            TensorDataset(images, labels),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(derive_seed(seed, 2, epoch)),
        )

    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=int(epochs),
        train_data_loader=loader_for(0),
        network=net,
        optimizer=optimizer,
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch,
        decollate=False,
    )
    trainer.logger.setLevel(logging.WARNING)
    ema = None
    if protocol == "glad":
        ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.995))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(engine):
        scheduler.step()
        if ema is not None:
            ema.update_parameters(net)
        if source.resample is not None and engine.state.epoch < engine.state.max_epochs:
            engine.set_data(loader_for(engine.state.epoch))

    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    trained = ema.module if ema is not None else net
    return trained.eval(), {"train_seconds": round(seconds, 3), "lr": lr, "epochs": int(epochs)}


def train_and_test(
    backbone: str,
    source: ImageSource,
    test: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    **settings: Any,
) -> dict[str, Any]:
    """Train ``backbone`` from scratch on ``source`` and test it on ``test``.

    Args:
        backbone, source, mean, std: see :func:`train_classifier`.
        test: the real test split (also gives the class count).
        settings: :func:`train_classifier`'s keyword arguments (``protocol``, ``epochs``, ``batch_size``, ``lr``,
            ``dsa_strategy``, ``seed``, ``device``).

    Returns:
        ``accuracy``, ``auc``, ``f1``, ``per_class_accuracy``, ``train_seconds``, ``lr``, ``epochs``.
    """
    net, record = train_classifier(backbone, source, test.num_classes, mean, std, **settings)
    dev = next(net.parameters()).device
    mean_t = torch.tensor(list(mean), device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=dev).view(1, -1, 1, 1)
    return {**_test(net, test, mean_t, std_t, dev), **record}


def _test(net: torch.nn.Module, test: ImageSet, mean_t: torch.Tensor, std_t: torch.Tensor, dev) -> dict[str, Any]:
    probabilities: list[torch.Tensor] = []

    def prepare(batch, device=None, non_blocking=False, **kwargs):  # noqa: ARG001 - MONAI's signature
        images, labels = batch
        return (images.to(dev).float() / 255.0 - mean_t) / std_t, labels.to(dev)

    evaluator = SupervisedEvaluator(
        device=dev,
        val_data_loader=DataLoader(TensorDataset(test.images, test.labels), batch_size=256),
        network=net,
        prepare_batch=prepare,
        decollate=False,
    )
    evaluator.logger.setLevel(logging.WARNING)
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: probabilities.append(torch.softmax(engine.state.output["pred"].float(), 1).cpu()),
    )
    evaluator.run()
    return classification_metrics(torch.cat(probabilities).numpy(), test.labels.numpy(), test.num_classes)


def summarise(results: list[dict[str, Any]], distil_backbone: str = "convnet") -> dict[str, Any]:
    """Mean and std per backbone, and the cross-architecture average over the backbones other than the one used
    to distil."""
    per: dict[str, dict[str, Any]] = {}
    for backbone in dict.fromkeys(r["backbone"] for r in results):
        runs = [r for r in results if r["backbone"] == backbone]
        entry: dict[str, Any] = {"runs": len(runs)}
        for key in ("accuracy", "auc", "f1", "train_seconds"):
            values = [r[key] for r in runs if not (isinstance(r[key], float) and math.isnan(r[key]))]
            entry[key] = statistics.fmean(values) if values else float("nan")
            entry[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        per[backbone] = entry
    cross = [v["accuracy"] for k, v in per.items() if k != distil_backbone]
    return {
        "per_backbone": per,
        "cross_architecture_accuracy": statistics.fmean(cross) if cross else None,
        "distil_backbone": distil_backbone,
    }


def _summary_markdown(summary: dict[str, Any], header: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of {header['distilled']}",
        "",
        f"Protocol `{header['protocol']}`, {header['epochs']} epochs, {header['runs']} run(s) per backbone, "
        f"mode `{header['mode']}`, tested on the real `{header['test_split']}` split of `{header['dataset_flag']}` "
        f"({header['test_images']} images).",
        "",
        "| backbone | accuracy (%) | macro AUC | macro F1 | train s/run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in summary["per_backbone"].items():
        lines.append(
            f"| {name} | {100 * v['accuracy']:.2f} ± {100 * v['accuracy_std']:.2f} | {v['auc']:.3f} ± "
            f"{v['auc_std']:.3f} | {v['f1']:.3f} ± {v['f1_std']:.3f} | {v['train_seconds']:.1f} |"
        )
    cross = summary["cross_architecture_accuracy"]
    if cross is not None:
        lines += [
            "",
            f"Cross-architecture accuracy (mean over the backbones other than "
            f"`{summary['distil_backbone']}`): {100 * cross:.2f} %",
        ]
    return "\n".join(lines) + "\n"


def _bar_chart(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    names = list(summary["per_backbone"])
    means = [100 * summary["per_backbone"][n]["accuracy"] for n in names]
    stds = [100 * summary["per_backbone"][n]["accuracy_std"] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4C72B0")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def evaluate_image_set(
    source: ImageSource,
    train: ImageSet,
    test: ImageSet,
    output_dir: str | os.PathLike,
    backbones: Sequence[str] = ("convnet", "alexnet", "vgg11", "resnet18", "vit"),
    runs: int = 2,
    epochs: int = 300,
    protocol: str = "dc",
    seed: int = 0,
    device: str | torch.device = "auto",
    header: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
    run_name: str = "evaluation",
    dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
) -> dict[str, Any]:
    """Train ``runs`` classifiers of every backbone on ``source``, test them on ``test``, write the results.

    Writes ``results.json`` (every run, written after each so a crash keeps finished runs), ``summary.md`` and
    ``accuracy.png`` under ``output_dir``, and, with ``tracking_uri``, an MLflow run with per-backbone metrics and
    those files as artefacts.

    Returns:
        ``{"runs": [...], "summary": {...}}``.
    """
    if runs < 1 or epochs < 1 or not backbones:
        raise ValueError(f"need runs >= 1, epochs >= 1 and at least one backbone; got {runs}, {epochs}, {backbones}")
    for name in backbones:  # fail on an unknown or unsuitable backbone before training anything
        get_classifier(name, test.channels, test.num_classes, test.image_size)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = train.normalization()
    header = {
        "protocol": protocol,
        "epochs": epochs,
        "runs": runs,
        "backbones": list(backbones),
        "test_images": len(test),
        **(header or {}),
    }
    header.setdefault("distilled", source.description.get("path", source.description.get("kind")))
    header.setdefault("mode", source.description.get("mode", "fixed"))
    header.setdefault("test_split", "test")
    header.setdefault("dataset_flag", train.name)
    results: list[dict[str, Any]] = []
    # under torchrun every rank trains its share of the (backbone, run) pairs; rank 0 gathers and writes
    pairs = distributed.shard([(backbone, run) for backbone in backbones for run in range(runs)])
    total, start = len(pairs), time.perf_counter()
    progress = out / ("results.json" if distributed.is_main() else f"results.rank{distributed.rank()}.json")
    for backbone, run in pairs:
        metrics = train_and_test(
            backbone,
            source,
            test,
            mean,
            std,
            protocol=protocol,
            epochs=epochs,
            dsa_strategy=dsa_strategy,
            seed=derive_seed(seed, run),
            device=device,
        )
        results.append({"backbone": backbone, "run": run, **metrics})
        done = len(results)
        eta = (time.perf_counter() - start) / done * (total - done)
        logger.info(
            f"{distributed.rank_note()}evaluation {done}/{total}: {backbone} run {run + 1}/{runs} accuracy "
            f"{100 * metrics['accuracy']:.2f}% AUC {metrics['auc']:.3f} F1 {metrics['f1']:.3f} | "
            f"{metrics['train_seconds']:.1f} s | ETA {format_duration(eta)}"
        )
        atomic_save_json({"header": header, "source": source.description, "runs": results}, progress)
    if distributed.world_size() > 1:
        order = {(b, r): k for k, (b, r) in enumerate((b, r) for b in backbones for r in range(runs))}
        results = sorted(
            (row for part in distributed.gather(results) for row in part),
            key=lambda row: order[row["backbone"], row["run"]],
        )
        if not distributed.is_main():
            progress.unlink(missing_ok=True)  # rank 0 writes them all
            return {"runs": results, "summary": summarise(results)}
        header["ranks"] = distributed.world_size()
    summary = summarise(results)
    atomic_save_json(
        {"header": header, "source": source.description, "runs": results, "summary": summary}, out / "results.json"
    )
    atomic_write(out / "summary.md", lambda f: f.write(_summary_markdown(summary, header).encode()))
    _bar_chart(summary, out / "accuracy.png", f"{header['distilled']} ({protocol}, {epochs} epochs)")
    if tracking_uri:
        _log_mlflow(tracking_uri, experiment_name, run_name, header, summary, out)
    return {"runs": results, "summary": summary}


def _log_mlflow(uri: str, experiment: str, run_name: str, header: dict, summary: dict, out: Path) -> None:
    import mlflow

    from monai_pld.utils import flatten_params, mlflow_experiment

    exp_id = mlflow_experiment(uri, experiment)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(exp_id, run_name=run_name)
    run_id = run.info.run_id
    for key, value in flatten_params(header).items():
        client.log_param(run_id, key, str(value)[:6000])
    for name, values in summary["per_backbone"].items():
        for key in ("accuracy", "accuracy_std", "auc", "f1", "train_seconds"):
            if not math.isnan(values[key]):
                client.log_metric(run_id, f"{name}_{key}", float(values[key]))
    if summary["cross_architecture_accuracy"] is not None:
        client.log_metric(run_id, "cross_architecture_accuracy", float(summary["cross_architecture_accuracy"]))
    for name in ("results.json", "summary.md", "accuracy.png"):
        client.log_artifact(run_id, str(out / name), artifact_path="evaluation")
    client.set_terminated(run_id)


def default_evaluation_dir(distilled: str | os.PathLike, dataset_flag: str, image_size: int, mode: str) -> str:
    """Where the evaluation of ``distilled`` is written by default: ``<run>/evaluation_<mode>`` for a run folder,
    ``<package>_evaluation_<mode>`` beside a package or a file (a package must stay exactly as exported), and
    ``results/baseline_<flag>_<size>px_<name>/evaluation_<mode>`` for ``random``/``full``."""
    from monai_pld.export import is_package

    name = str(distilled)
    if name in ("random", "full"):
        return os.path.join("results", f"baseline_{dataset_flag}_{image_size}px_{name}", f"evaluation_{mode}")
    path = Path(name)
    if (path.is_dir() and not is_package(path)) or path.name in ("images.npz", "distribution.pt"):
        folder = path if path.is_dir() else path.parent  # a run, or a file of its distilled/ folder
        return str(folder / f"evaluation_{mode}")
    return str(path.parent / f"{path.name if path.is_dir() else path.stem}_evaluation_{mode}")


def check_evaluation_config(
    runs: Any, epochs: Any, backbones: Any, protocol: Any, mode: Any, distilled: Any
) -> dict[str, Any]:
    """Check the evaluation bundle's values before any data are read.

    Raises:
        ConfigError: naming the key, the value and what is accepted.
    """
    from monai_pld.networks.classifiers import CLASSIFIERS
    from monai_pld.utils import ConfigError

    for key, value in (("runs", runs), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"'{key}' must be an integer >= 1, got {value!r}")
    if isinstance(backbones, str):
        backbones = [b.strip() for b in backbones.split(",") if b.strip()]
    if not isinstance(backbones, (list, tuple)) or not backbones:
        raise ConfigError(f"'backbones' must be a non-empty list, got {backbones!r}; e.g. --backbones \"['convnet']\"")
    unknown = [b for b in backbones if str(b).lower() not in CLASSIFIERS]
    if unknown:
        raise ConfigError(f"'backbones' has unknown names {unknown}; known: {sorted(CLASSIFIERS)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"'protocol' must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if mode not in EVAL_MODES:
        raise ConfigError(f"'mode' must be one of {list(EVAL_MODES)}, got {mode!r}")
    if str(distilled) not in ("random", "full") and not Path(str(distilled)).exists():
        raise ConfigError(
            f"'distilled' {distilled!r} does not exist; give a run folder, an images.npz, a distribution.pt, a "
            "package (folder or .zip), 'random' or 'full'"
        )
    return {"backbones": [str(b).lower() for b in backbones]}
