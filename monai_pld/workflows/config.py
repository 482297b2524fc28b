"""The checks the bundles run on their configuration values before any data are read or anything is trained:
distillation, evaluation and export. Each names the offending key, its value and what is accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai_pld.data import EVAL_MODES, check_dataset
from monai_pld.defaults import OPTIMIZERS, default_learning_rates
from monai_pld.evaluation import PROTOCOLS
from monai_pld.formats.distilled import read_distilled_folder
from monai_pld.formats.experts import TRAIN_EXPERTS_COMMAND
from monai_pld.formats.package import PackageError
from monai_pld.matching.distribution import ESTIMATORS, KERNELS
from monai_pld.networks.classifiers import CLASSIFIERS
from monai_pld.utils import (
    BASELINES,
    MATCHERS,
    PARAMETERIZATIONS,
    ConfigError,
    as_bool,
    check_generator_settings,
    check_int,
    check_number,
    resolve_device,
)

__all__ = ["check_distillation_config", "check_evaluation_config", "check_export_config"]


def check_distillation_config(
    ipc: Any,
    iterations: Any,
    matcher: Any,
    parameterization: Any,
    rank: Any,
    image_size: Any,
    seed: Any = 0,
    device: Any = "auto",
    samples_per_slot: Any = 1,
    batch_real_per_class: Any = 64,
    kl_weight: Any = 0.0,
    lr_codes: Any = 0.01,
    lr_network: Any = 0.001,
    log_interval: Any = 1,
    checkpoint_interval: Any = 1,
    resume: Any = False,
    download: Any = True,
    antithetic: Any = False,
    dataset_flag: Any = None,
    lr_matcher: Any = 1e-5,
    dc_loops: Any = "reference",
    mtt_syn_steps: Any = 20,
    mtt_expert_epochs: Any = 3,
    mtt_max_start_epoch: Any = 25,
    mtt_batch_syn: Any = None,
    dataset_dir: Any = None,
    data_options: Any = None,
    latent_layer: Any = 0,
    include_mean: Any = True,
    dm_estimator: Any = "pooled",
    dm_kernel: Any = "linear",
    dm_std_weight: Any = 0.0,
    optimizer: Any = "adam",
    momentum: Any = 0.5,
    generator: Any = None,
    expert_dir: Any = None,
    init: Any = "real",
    hidden_channels: Any = 32,
    decode_chunk: Any = 30,
) -> dict[str, Any]:
    """Check every distillation config value before any work starts.

    ``lr_codes``/``lr_network`` may be ``auto``: the per-space defaults of :mod:`monai_pld.defaults` for this
    parameterisation, matcher and ``latent_layer`` (and ``ipc`` 1; SLFD's network rate also by ``iterations``).
    ``generator`` holds the pretraining settings (``steps``, ``batch_size``, ``lr``, ``kl_weight``, ``augment``,
    ``policy``...).

    Returns:
        the normalised values (booleans parsed, device resolved to a string, learning rates resolved) and
        ``iterations``: the configured number, or 1 for the real-image baselines (``random``/``full``), which have
        nothing to optimise.

    Raises:
        ConfigError: naming the first offending key, its value and what is accepted.
    """
    check_int("ipc", ipc, 1)
    check_int("iterations", iterations, 1)
    check_int("rank", rank, 0)
    check_int("seed", seed, 0)
    check_int("samples_per_slot", samples_per_slot, 1)
    check_int("batch_real_per_class", batch_real_per_class, 1)
    check_int("log_interval", log_interval, 1)
    check_int("checkpoint_interval", checkpoint_interval, 1)
    if matcher not in MATCHERS:
        raise ConfigError(f"'matcher' must be one of {list(MATCHERS)}, got {matcher!r}; e.g. --matcher dm")
    if parameterization not in PARAMETERIZATIONS + BASELINES:
        raise ConfigError(
            f"'parameterization' must be one of {list(PARAMETERIZATIONS + BASELINES)}, got {parameterization!r}; "
            "e.g. --parameterization slfd"
        )
    if dataset_flag is None:  # the dataset's own rules (monai_pld.data.check_dataset) are the size authority
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"'image_size' must be an integer >= 8, got {image_size!r}")
    else:
        try:
            check_dataset(dataset_flag, image_size, dataset_dir, data_options)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    check_number("lr_matcher", lr_matcher, 0.0)
    if dc_loops not in ("reference", "glad") and not (
        isinstance(dc_loops, (list, tuple))
        and len(dc_loops) == 2
        and all(isinstance(v, int) and v >= 1 for v in dc_loops)
    ):
        raise ConfigError(
            f"'dc_loops' must be 'reference', 'glad' or a pair [outer, inner] of positive integers, got {dc_loops!r}"
        )
    check_int("mtt_syn_steps", mtt_syn_steps, 1)
    check_int("mtt_expert_epochs", mtt_expert_epochs, 1)
    check_int("mtt_max_start_epoch", mtt_max_start_epoch, 0)
    if mtt_batch_syn is not None:
        check_int("mtt_batch_syn", mtt_batch_syn, 1)
    if matcher == "mtt" and expert_dir is not None and not any(Path(str(expert_dir)).glob("expert_*.pt")):
        # MTT does not train its experts on first use (they take longer than most distillations, and one set
        # serves every MTT run of the same data and network): it stops here, before the generator or the data
        raise ConfigError(
            f"--matcher mtt needs expert trajectories, and expert_dir {expert_dir} holds none: train them first "
            f"({TRAIN_EXPERTS_COMMAND}, the same dataset, image size and matching network), or point --expert_dir "
            "at a folder of experts"
        )
    check_number("kl_weight", kl_weight, 0.0)
    check_int("latent_layer", latent_layer, 0)
    if init not in ("real", "noise"):
        raise ConfigError(f"'init' must be 'real' (encodings of real images) or 'noise', got {init!r}")
    check_int("hidden_channels", hidden_channels, 1)
    check_int("decode_chunk", decode_chunk, 0)
    # latent_layer splits the generator's decoder; pixel and the real-image baselines have no decoder and ignore it
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"'optimizer' must be one of {list(OPTIMIZERS)}, got {optimizer!r}; e.g. --optimizer adam")
    check_number("momentum", momentum, 0.0)
    if parameterization in PARAMETERIZATIONS:
        auto_codes, auto_network = default_learning_rates(
            parameterization, matcher, int(latent_layer), int(ipc), int(iterations)
        )
    else:
        auto_codes, auto_network = 1.0, 1.0  # nothing is optimised
    lr_codes = auto_codes if lr_codes == "auto" else lr_codes
    lr_network = auto_network if lr_network == "auto" else lr_network
    check_number("lr_codes", lr_codes, 0.0, strict=True)
    check_number("lr_network", lr_network, 0.0, strict=True)
    if generator is not None:
        check_generator_settings(generator)
    antithetic = as_bool(antithetic, "antithetic")
    if antithetic and samples_per_slot % 2:
        raise ConfigError(f"'samples_per_slot' must be even with antithetic sampling, got {samples_per_slot}")
    if dm_estimator not in ESTIMATORS:
        raise ConfigError(f"'dm_estimator' must be one of {list(ESTIMATORS)}, got {dm_estimator!r}")
    if dm_kernel not in KERNELS:
        raise ConfigError(f"'dm_kernel' must be one of {list(KERNELS)}, got {dm_kernel!r}")
    if dm_kernel != "linear" and dm_estimator != "pooled" and matcher == "dm":
        raise ConfigError(
            f"'dm_kernel' {dm_kernel} compares whole distributions and has no unbiased estimator: "
            "set --dm_estimator pooled or --dm_kernel linear"
        )
    check_number("dm_std_weight", dm_std_weight, 0.0)
    if dm_std_weight and matcher == "dm" and (dm_kernel != "linear" or dm_estimator != "pooled"):
        raise ConfigError(
            "'dm_std_weight' adds a spread term to the pooled comparison of class means: set --dm_std_weight 0, or "
            "--dm_kernel linear and --dm_estimator pooled"
        )
    if dm_estimator == "unbiased" and matcher == "dm" and parameterization == "slfd":
        if samples_per_slot % 2 or antithetic:
            raise ConfigError(
                "'dm_estimator' unbiased compares two independent halves of each slot's samples: it needs an even "
                f"'samples_per_slot' (got {samples_per_slot}) and 'antithetic' false (got {antithetic}); "
                "e.g. --samples_per_slot 2 --antithetic false"
            )
    return {
        "resume": as_bool(resume, "resume"),
        "download": as_bool(download, "download"),
        "antithetic": antithetic,
        "device": str(resolve_device(device)),
        "iterations": 1 if parameterization in BASELINES else int(iterations),
        "include_mean": as_bool(include_mean, "include_mean"),
        "lr_codes": float(lr_codes),
        "lr_network": float(lr_network),
    }


def check_evaluation_config(
    runs: Any,
    epochs: Any,
    backbones: Any,
    protocol: Any,
    mode: Any,
    distilled: Any,
    ipc: Any = 1,
    test_split: Any = "test",
) -> dict[str, Any]:
    """Check the evaluation bundle's values before any data are read.

    Raises:
        ConfigError: naming the key, the value and what is accepted.
    """
    if test_split not in ("test", "val"):
        raise ConfigError(
            f"'test_split' must be 'test' or 'val' (the classifiers train on the distilled set and are tested on "
            f"real images they never saw), got {test_split!r}"
        )
    for key, value in (("runs", runs), ("epochs", epochs), ("ipc", ipc)):
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


def check_export_config(distilled: Any, audit_percentile: Any, audit_feature_epochs: Any, heldout_split: Any) -> None:
    """Check the export bundle's values before any data are read.

    Raises:
        ConfigError: naming the key, the value and what is accepted.
    """
    try:
        read_distilled_folder(distilled)
    except PackageError as e:
        raise ConfigError(f"'distilled': {e}") from e
    ok = isinstance(audit_percentile, (int, float)) and not isinstance(audit_percentile, bool)
    if not ok or not 0 < audit_percentile < 100:
        raise ConfigError(f"'audit_percentile' must be a number in (0, 100), got {audit_percentile!r}")
    epochs = audit_feature_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"'audit_feature_epochs' must be an integer >= 0 (0 = pixel distances only), got {epochs!r}")
    if heldout_split not in ("val", "test"):
        raise ConfigError(f"'heldout_split' must be 'val' or 'test' (never the training split), got {heldout_split!r}")
