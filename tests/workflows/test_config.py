import json

import pytest
import torch
from helpers import REPO

from monai_pld.defaults import (
    DEFAULT_LEARNING_RATES,
    IPC1_LEARNING_RATES,
    UNSELECTED_NETWORK_RATE,
    default_learning_rates,
)
from monai_pld.utils import (
    ConfigError,
    as_bool,
    atomic_save_json,
    derive_seed,
    resolve_device,
)
from monai_pld.workflows import check_distillation_config

GOOD = dict(ipc=10, iterations=5, matcher="dm", parameterization="slfd", rank=8, image_size=28)


def test_good_config_is_normalised():
    out = check_distillation_config(**GOOD, resume="true", download="False", device="cpu", lr_codes=0.2)
    assert out == {
        "resume": True,
        "download": False,
        "antithetic": False,
        "device": "cpu",
        "iterations": 5,
        "include_mean": True,
        "lr_codes": 0.2,
        "lr_network": 0.001,
    }


@pytest.mark.parametrize("kind,layer", [("pixel", 0), ("latent", 0), ("slfd", 0), ("latent", 2), ("slfd", 3)])
@pytest.mark.parametrize("matcher", ["dm", "dc", "mtt"])
def test_auto_learning_rates_are_those_of_the_space(kind, layer, matcher):
    out = check_distillation_config(
        **{**GOOD, "parameterization": kind, "matcher": matcher}, latent_layer=layer, lr_codes="auto", lr_network="auto"
    )
    space = "pixel" if kind == "pixel" else "feature" if layer else "latent"
    assert (out["lr_codes"], out["lr_network"]) == DEFAULT_LEARNING_RATES[(space, matcher)]


def test_default_learning_rates_are_the_committed_selection():
    """The tables in monai_pld/defaults.py are the output of benchmarks/select_learning_rates.py, committed as data:
    the many-image table, and at IPC 1 the value of every parameterisation the selection covered."""
    chosen = json.loads((REPO / "docs" / "tuning" / "learning_rates.json").read_text())
    at_one = [e for e in chosen["chosen"] if e.get("ipc") == 1]
    assert at_one and len(at_one) < len(chosen["chosen"])
    for entry in chosen["chosen"]:
        if entry.get("ipc") == 1:
            layer = 2 if entry["space"] == "feature" else 0
            lr = default_learning_rates(entry["parameterization"], entry["matcher"], layer, ipc=1)[0]
            assert lr == entry["lr_codes"], entry
        elif "lr_network" in entry:  # SLFD's network, selected on its own grid
            assert DEFAULT_LEARNING_RATES[(entry["space"], entry["matcher"])][1] == entry["lr_network"], entry
        else:
            assert DEFAULT_LEARNING_RATES[(entry["space"], entry["matcher"])][0] == entry["lr_codes"], entry
    # every IPC 1 exception in the table comes from the selection (DC and MTT take DM's values)
    for (kind, space, _), lr in IPC1_LEARNING_RATES.items():
        assert any(e["parameterization"] == kind and e["space"] == space and e["lr_codes"] == lr for e in at_one)
    # every network rate other than the unselected one comes from a selection of its own (space and matcher)
    network = {(e["space"], e["matcher"]): e["lr_network"] for e in chosen["chosen"] if "lr_network" in e}
    assert network
    for key, (_, lr_network) in DEFAULT_LEARNING_RATES.items():
        assert lr_network == network.get(key, UNSELECTED_NETWORK_RATE), key


@pytest.mark.parametrize("kind,layer", [("slfd", 2), ("latent", 2), ("pixel", 0), ("slfd", 0)])
def test_auto_learning_rate_at_one_image_per_class(kind, layer):
    """lr_codes auto at IPC 1 takes the IPC 1 selection where there is one (SLFD in a feature map), else the
    many-image value of the space; an explicit value is kept."""
    many = check_distillation_config(
        **{**GOOD, "parameterization": kind}, latent_layer=layer, lr_codes="auto", lr_network="auto"
    )
    one = check_distillation_config(
        **{**GOOD, "parameterization": kind, "ipc": 1}, latent_layer=layer, lr_codes="auto", lr_network="auto"
    )
    space = "pixel" if kind == "pixel" else "feature" if layer else "latent"
    assert many["lr_codes"] == DEFAULT_LEARNING_RATES[(space, "dm")][0]
    assert one["lr_codes"] == IPC1_LEARNING_RATES.get((kind, space, "dm"), many["lr_codes"])
    if (kind, layer) == ("slfd", 2):
        assert one["lr_codes"] < many["lr_codes"]
        # the network's rate was selected at IPC 10; IPC 1 keeps the one its own selection ran with
        assert many["lr_network"] == DEFAULT_LEARNING_RATES[("feature", "dm")][1] > one["lr_network"]
        assert one["lr_network"] == UNSELECTED_NETWORK_RATE
    given = check_distillation_config(**{**GOOD, "parameterization": kind, "ipc": 1}, latent_layer=layer, lr_codes=0.2)
    assert given["lr_codes"] == 0.2


@pytest.mark.parametrize("kind", ["pixel", "random", "full"])
def test_latent_layer_is_ignored_without_a_decoder(kind):
    out = check_distillation_config(**{**GOOD, "parameterization": kind}, latent_layer=2)
    if kind == "pixel":
        assert out["lr_codes"] == DEFAULT_LEARNING_RATES[("pixel", "dm")][0]


@pytest.mark.parametrize(
    "settings,key",
    [
        ({"steps": 0}, "generator_steps"),
        ({"batch_size": 1.5}, "generator_batch_size"),
        ({"lr": -1}, "generator_lr"),
        ({"augment": "rotate"}, "generator_augment"),
        ({"policy": "sometimes"}, "generator_policy"),
        ({"network": {"downsamplings": 0}}, "generator_downsamplings"),
        ({"network": {"latent_channels": "4"}}, "generator_latent_channels"),
        ({"seed": -1}, "generator_seed"),
    ],
)
def test_bad_generator_setting_names_the_key(settings, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_distillation_config(**GOOD, generator=settings)


@pytest.mark.parametrize("baseline", ["random", "full"])
def test_baselines_run_one_iteration(baseline):
    assert check_distillation_config(**{**GOOD, "parameterization": baseline})["iterations"] == 1


@pytest.mark.parametrize("matcher", ["dm", "dc", "mtt"])
def test_every_matcher_is_accepted(matcher):
    assert check_distillation_config(**{**GOOD, "matcher": matcher})["iterations"] == 5


@pytest.mark.parametrize(
    "flag,size,ok",
    [
        ("cifar10", 32, True),
        ("cifar10", 28, False),
        ("imagenette", 128, True),
        ("imagenette", 96, True),  # the dataset's rules are the one size authority
        ("imagenette", 4, False),
        ("pathmnist", 32, False),
        ("chestmnist", 28, False),
        ("nonsense", 28, False),
    ],
)
def test_dataset_and_image_size_are_checked_together(flag, size, ok):
    if ok:
        check_distillation_config(**{**GOOD, "image_size": size}, dataset_flag=flag)
    else:
        with pytest.raises(ConfigError, match="'image_size'|'dataset_flag'"):
            check_distillation_config(**{**GOOD, "image_size": size}, dataset_flag=flag)


@pytest.mark.parametrize(
    "key,value",
    [
        ("ipc", 0),
        ("ipc", 2.5),
        ("iterations", -1),
        ("matcher", "xyz"),
        ("parameterization", "voxels"),
        ("rank", -1),
        ("image_size", 4),
        ("image_size", 28.0),
        ("seed", -3),
        ("samples_per_slot", 0),
        ("kl_weight", -0.1),
        ("lr_codes", 0),
        ("lr_network", float("nan")),
        ("resume", "maybe"),
        ("device", "tpu"),
        ("dc_loops", "sometimes"),
        ("dc_loops", [0, 5]),
        ("mtt_syn_steps", 0),
        ("mtt_expert_epochs", 0),
        ("mtt_max_start_epoch", -1),
        ("mtt_batch_syn", 0),
        ("lr_matcher", -1.0),
        ("lr_codes", "fast"),
        ("optimizer", "lbfgs"),
        ("momentum", -0.5),
        ("latent_layer", -1),
    ],
)
def test_bad_value_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_distillation_config(**{**GOOD, key: value})


def test_antithetic_needs_even_samples():
    with pytest.raises(ConfigError, match="samples_per_slot"):
        check_distillation_config(**GOOD, antithetic=True, samples_per_slot=3)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_as_bool():
    assert as_bool("yes", "k") is True and as_bool(0, "k") is False
    with pytest.raises(ConfigError, match="'k'"):
        as_bool(2, "k")


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    assert len({derive_seed(0, i) for i in range(100)} | {derive_seed(1, 0)}) == 101
    assert 0 <= derive_seed(7, 1) < 2**63


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = atomic_save_json({"a": 1}, tmp_path / "m.json")
    with pytest.raises(TypeError):
        atomic_save_json({"a": object()}, path)
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind


def test_mtt_without_experts_stops_before_any_work_with_the_command(tmp_path):
    with pytest.raises(ConfigError, match="train_experts.yaml") as raised:
        check_distillation_config(**{**GOOD, "matcher": "mtt"}, expert_dir=tmp_path / "experts")
    assert str(tmp_path / "experts") in str(raised.value)
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "expert_000.pt").write_bytes(b"")  # its contents are checked when the matcher reads it
    assert check_distillation_config(**{**GOOD, "matcher": "mtt"}, expert_dir=tmp_path / "experts")["resume"] is False
    assert check_distillation_config(**GOOD, expert_dir=tmp_path / "none")["resume"] is False  # only MTT needs them


def test_dm_estimator_values():
    with pytest.raises(ConfigError, match="'dm_estimator' must be one of"):
        check_distillation_config(**GOOD, dm_estimator="median")
    for bad in ({"samples_per_slot": 1}, {"samples_per_slot": 2, "antithetic": True}):
        with pytest.raises(ConfigError, match="'dm_estimator' unbiased .* even 'samples_per_slot'"):
            check_distillation_config(**GOOD, dm_estimator="unbiased", **bad)
    check_distillation_config(**GOOD, dm_estimator="unbiased", samples_per_slot=2)
    # nothing to split for deterministic rows or other matchers
    check_distillation_config(**{**GOOD, "parameterization": "latent"}, dm_estimator="unbiased")
    check_distillation_config(**{**GOOD, "matcher": "dc"}, dm_estimator="unbiased")


def test_dm_kernel_values():
    with pytest.raises(ConfigError, match="'dm_kernel' must be one of"):
        check_distillation_config(**GOOD, dm_kernel="rbf")
    with pytest.raises(ConfigError, match="'dm_kernel' gaussian .* --dm_estimator pooled"):
        check_distillation_config(**GOOD, dm_kernel="gaussian", dm_estimator="unbiased", samples_per_slot=2)
    check_distillation_config(**GOOD, dm_kernel="gaussian")
    check_distillation_config(**{**GOOD, "matcher": "dc"}, dm_kernel="gaussian", dm_estimator="unbiased")


def test_dm_std_weight_values():
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(ConfigError, match="'dm_std_weight' must be a finite number >= 0"):
            check_distillation_config(**GOOD, dm_std_weight=bad)
    for other in ({"dm_kernel": "gaussian"}, {"dm_estimator": "unbiased", "samples_per_slot": 2}):
        with pytest.raises(ConfigError, match="'dm_std_weight' adds a spread term .* --dm_std_weight 0"):
            check_distillation_config(**GOOD, dm_std_weight=1, **other)
    check_distillation_config(**GOOD, dm_std_weight=1)
    check_distillation_config(**{**GOOD, "matcher": "mtt"}, dm_std_weight=1, dm_kernel="gaussian")
