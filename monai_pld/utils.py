"""Small shared helpers, the lowest layer above ``distributed`` and ``defaults``: atomic file writes, checksums,
checks of single config values, seeds, durations, version records and the MLflow experiment every run logs into.

Checks that need datasets or registries (``check_distillation_config`` and the other bundle checks) live in
:mod:`monai_pld.workflows.config`."""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import torch

import monai_pld
from monai_pld import distributed

__all__ = [
    "ConfigError",
    "as_bool",
    "atomic_write",
    "atomic_save_torch",
    "atomic_save_json",
    "atomic_savez",
    "sha256_file",
    "library_versions",
    "resolve_device",
    "configure_cpu_allocator",
    "derive_seed",
    "check_generator_settings",
    "check_int",
    "check_number",
    "format_duration",
    "flatten_params",
    "default_artifact_location",
    "mlflow_experiment",
    "mlflow_run",
    "MATCHERS",
    "PARAMETERIZATIONS",
    "BASELINES",
]

MATCHERS = ("dm", "dc", "mtt")
PARAMETERIZATIONS = ("slfd", "latent", "pixel")  # monai_pld.defaults keys its learning rates by these
BASELINES = ("random", "full")

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is accepted."""


def as_bool(value: Any, key: str) -> bool:
    """Read a boolean config value, accepting the strings a command line produces (``true``, ``False``, ``1``...).

    Raises:
        ConfigError: when ``value`` is not a recognisable boolean.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise ConfigError(f"'{key}' must be true or false, got {value!r}; e.g. --{key} true")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write a file so that readers see either the old complete file or the new complete one, never a partial one.

    ``write`` receives a binary file object in the same directory; the file is flushed, fsynced and renamed over
    ``path`` only when ``write`` returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write indented UTF-8 JSON through :func:`atomic_write`."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``numpy.savez_compressed`` through :func:`atomic_write` (no object arrays, so it loads without pickle)."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array '{name}' has dtype object, which would need pickle to load; use str or numbers")
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine a result, for manifests and checkpoints."""
    import ignite
    import monai

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses to unpickle.
    versions = {
        "monai_pld": str(monai_pld.__version__),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "monai": str(monai.__version__),
        "pytorch-ignite": str(ignite.__version__),
        "numpy": str(np.__version__),
    }
    try:
        import medmnist

        versions["medmnist"] = str(medmnist.__version__)
    except Exception:  # medmnist swallows its own import errors; a missing version is not fatal for a record
        pass
    return versions


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a config value (``cpu``, ``cuda``, ``cuda:1``, ``auto`` or None) into a device, checking availability.

    Raises:
        ConfigError: for an unknown device string or CUDA asked for on a machine without it.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or str(device).lower() == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as e:
            raise ConfigError(f"'device' must be 'auto', 'cpu' or 'cuda[:index]', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'device' is {device!r} but CUDA is not available here; use --device cpu (or auto)")
    if dev.type == "cuda" and distributed.world_size() > 1:
        dev = distributed.rank_device(dev)  # one GPU per rank under torchrun
    return dev


CPU_ALLOCATORS = ("tuned", "default")
# glibc's mallopt parameters (malloc.h) and the values "tuned" sets: buffers under 32 MiB (glibc's largest allowed
# mmap threshold on 64-bit) come from the heap, and up to 256 MiB of freed heap is kept for the next step
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TUNED = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 256 << 20}
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def configure_cpu_allocator(mode: str = "tuned") -> bool:
    """Keep the CPU's activation buffers in the heap between steps instead of mapping them afresh for each call.

    glibc serves every allocation above its mmap threshold (128 KiB, raised only as large blocks are freed) with a
    fresh ``mmap`` and returns it with ``munmap`` on free, so each of a ConvNet's multi-MiB activation maps is
    zero-filled page by page by the kernel on every call, and heap memory above 128 KiB at its top is given back
    and faulted in again. Measured in ``docs/benchmarks.md`` (``benchmarks/dm_speed.py``,
    ``benchmarks/evaluation_cost.py``): 16-19 % of a ConvNet evaluation run, 0-4 % of a DM iteration here (whose
    chunked embedding already lets glibc's own threshold catch up), 6-34 % of the reference's.
    ``"tuned"`` raises both thresholds with ``mallopt``; the arithmetic and its results are unchanged, only where
    the memory comes from. It is process-wide, so it is done once, by the workflows that run on the CPU;
    ``"default"`` leaves the allocator alone (as does anything other
    than glibc, and a process whose environment already sets glibc's ``MALLOC_*_`` variables, which win).
    PyTorch has no caching allocator on the CPU and jemalloc/tcmalloc need ``LD_PRELOAD`` before start, hence this.

    Returns:
        whether the thresholds were set.

    Raises:
        ConfigError: for a mode other than ``"tuned"`` or ``"default"``.
    """
    if mode not in CPU_ALLOCATORS:
        raise ConfigError(f"'cpu_allocator' must be one of {list(CPU_ALLOCATORS)}, got {mode!r}")
    if mode == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _ALLOCATOR_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _TUNED.items())


def derive_seed(seed: int, *parts: int) -> int:
    """A deterministic 63-bit seed from a base seed and integers (e.g. the iteration), stable across runs."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``'1h02m05s'``; short durations keep one decimal (``'4.2s'``)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise :class:`ConfigError` unless config value ``name`` is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"'{name}' must be an integer >= {minimum}, got {value!r}; e.g. --{name} {max(minimum, 1)}")


def check_number(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a finite number ``>= minimum`` (``>`` when ``strict``)."""
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"'{name}' must be a finite number {bound}, got {value!r}")


def check_generator_settings(settings: Any) -> None:
    """Check the ``generator_*`` keys (passed as one mapping without the prefix) before anything is read or trained.

    Raises:
        ConfigError: naming the ``generator_*`` key at fault and what is accepted.
    """
    if not isinstance(settings, Mapping):
        raise ConfigError(f"the generator settings must be a mapping, got {settings!r}")
    network = settings.get("network") or {}
    for key in ("steps", "batch_size"):
        if key in settings:
            check_int(f"generator_{key}", settings[key], 1)
    if "seed" in settings:
        check_int("generator_seed", settings["seed"], 0)
    if settings.get("max_train_images") is not None:
        check_int("generator_max_train_images", settings["max_train_images"], 1)
    for key in ("downsamplings", "latent_channels"):
        if network.get(key) is not None:
            check_int(f"generator_{key}", network[key], 1)
    for key in ("lr", "kl_weight", "min_psnr"):
        if key in settings:
            check_number(f"generator_{key}", settings[key], 0.0)
    if settings.get("augment", "flip") not in ("flip", "none"):
        raise ConfigError(f"'generator_augment' must be 'flip' or 'none', got {settings['augment']!r}")
    if settings.get("policy", "match") not in ("match", "retrain", "any"):
        raise ConfigError(
            f"'generator_policy' must be 'match', 'retrain' or 'any', got {settings['policy']!r}; "
            "match stops when generator_path was made with other settings, retrain replaces it, any uses it as it is"
        )


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Config values as MLflow params: scalars kept, sequences joined, everything else as ``str``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = str(value)
    return out


def _artifact_uri(location: str | os.PathLike) -> str:
    """A folder (absolute or relative to the working directory) as a ``file://`` URI; URIs are kept as they are."""
    text = str(location)
    if "://" in text:
        return text
    return Path(text).expanduser().absolute().as_uri()


def default_artifact_location(tracking_uri: str | None) -> str | None:
    """Where the artefacts of a new MLflow experiment go: the folder ``mlruns`` beside the database of a SQLite
    tracking store (``sqlite:///mlruns.db`` -> ``./mlruns``), as MONAI's ``MLFlowHandler`` does; ``None`` for
    other stores (a tracking server decides itself) and for an in-memory database.

    Without it, MLflow puts a SQLite store's artefacts under the *working directory*, wherever the database is.
    """
    if not tracking_uri or not str(tracking_uri).startswith("sqlite:///"):
        return None
    path = unquote(urlsplit(str(tracking_uri)).path)  # "/rel.db" or "//abs.db" (one slash belongs to the URI)
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        return None
    return _artifact_uri(Path(path).parent / "mlruns")


def mlflow_experiment(
    tracking_uri: str | None, experiment_name: str, artifact_location: str | os.PathLike | None = None
) -> str | None:
    """The id of MLflow experiment ``experiment_name`` in ``tracking_uri``, created when missing with its artefacts
    in ``artifact_location`` (default: :func:`default_artifact_location`). Every run of the project logs through
    this experiment, so its artefacts never land in the working directory by accident.

    MLflow fixes an experiment's artefact folder when the experiment is created: an existing experiment keeps its
    own, and a different ``artifact_location`` given explicitly is reported as a warning. Returns ``None`` (and
    touches nothing) when ``tracking_uri`` is empty, and on every rank but 0 under ``torchrun`` (rank 0 alone logs;
    several processes creating one sqlite store at once would collide).
    """
    if not tracking_uri or not distributed.is_main():
        return None
    import mlflow

    wanted = _artifact_uri(artifact_location) if artifact_location else default_artifact_location(tracking_uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=str(tracking_uri))
        found = client.get_experiment_by_name(experiment_name)
    except (KeyError, mlflow.exceptions.MlflowException) as e:  # an unknown scheme ends in a bare KeyError
        raise ValueError(
            f"'tracking_uri' {str(tracking_uri)!r} cannot be used ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}); give e.g. sqlite:///mlruns.db, a folder, or the address "
            "of an MLflow server (http://host:5000), or '' to log nothing"
        ) from e
    if found is None:
        try:
            return client.create_experiment(experiment_name, artifact_location=wanted)
        except mlflow.exceptions.MlflowException:  # created by another process in the meantime
            found = client.get_experiment_by_name(experiment_name)
            if found is None:
                raise
    if artifact_location and found.artifact_location.rstrip("/") != str(wanted).rstrip("/"):
        logger.warning(
            f"MLflow experiment '{experiment_name}' already exists with its artefacts in {found.artifact_location}; "
            f"they stay there (mlflow_artifacts {artifact_location} applies to new experiments only)"
        )
    return found.experiment_id


@contextmanager
def mlflow_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Iterator[tuple[Any, str]]:
    """``with mlflow_run(uri, experiment, name, params) as (client, run_id):`` log into one MLflow run.

    The run is created in :func:`mlflow_experiment` (so its artefacts land where that experiment keeps them), gets
    ``params`` (flattened, each value cut to MLflow's 6,000 characters), and is ended FINISHED, or FAILED when the
    block raises. With ``run_id`` the block logs into that existing run instead and leaves its status alone.
    Client calls rather than ``mlflow.start_run``: no process-global active run, so a library call never ends or
    nests into a run its caller opened.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=str(tracking_uri))
    created = run_id is None
    if created:
        experiment_id = mlflow_experiment(tracking_uri, experiment_name)
        if experiment_id is None:
            raise RuntimeError("MLflow runs are written by rank 0 only; call mlflow_run there")
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    try:
        for key, value in flatten_params(params or {}).items():
            client.log_param(run_id, key, str(value)[:6000])
        yield client, run_id
    except BaseException:
        if created:
            client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id)
