import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from monai_pld.defaults import (
    DEFAULT_LEARNING_RATES,
    IPC1_LEARNING_RATES,
    NETWORK_RATES_BY_ITERATIONS,
    SELECTION_ITERATIONS,
    UNSELECTED_NETWORK_RATE,
    default_learning_rates,
    network_rate,
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
    the many-image table, at IPC 1 the value of every parameterisation the selection covered, and SLFD's network
    rate per budget."""
    chosen = json.loads((REPO / "docs" / "tuning" / "learning_rates.json").read_text())
    at_one = [e for e in chosen["chosen"] if e.get("ipc") == 1]
    assert at_one and len(at_one) < len(chosen["chosen"])
    for entry in chosen["chosen"]:
        if entry.get("ipc") == 1:
            layer = 2 if entry["space"] == "feature" else 0
            lr = default_learning_rates(entry["parameterization"], entry["matcher"], layer, ipc=1)[0]
            assert lr == entry["lr_codes"], entry
        elif "lr_network" in entry:  # SLFD's network, selected on its own grid at each budget
            assert network_rate(entry["space"], entry["matcher"], entry["iterations"]) == entry["lr_network"], entry
        else:  # the codes' rates do not depend on the budget: a selection at any budget must agree with the table
            assert DEFAULT_LEARNING_RATES[(entry["space"], entry["matcher"])][0] == entry["lr_codes"], entry
    # every IPC 1 exception in the table comes from the selection (DC and MTT take DM's values)
    for (kind, space, _), lr in IPC1_LEARNING_RATES.items():
        assert any(e["parameterization"] == kind and e["space"] == space and e["lr_codes"] == lr for e in at_one)
    # every network rate other than the unselected one comes from a selection of its own (space, matcher, budget)
    network = {
        (e["space"], e["matcher"], e["iterations"]): e["lr_network"] for e in chosen["chosen"] if "lr_network" in e
    }
    assert network
    assert {
        (space, matcher, it) for (space, matcher), rates in NETWORK_RATES_BY_ITERATIONS.items() for it in rates
    } == (set(network))
    for key, (_, lr_network) in DEFAULT_LEARNING_RATES.items():
        assert lr_network == network.get((*key, SELECTION_ITERATIONS), UNSELECTED_NETWORK_RATE), key


def test_network_rate_follows_the_budget():
    """lr_network auto takes the selection of the largest budget not above the run's iterations (the smallest
    budget's below them all); spaces and matchers without a selection keep the unselected rate at every length."""
    (space, matcher), by_budget = next(iter(NETWORK_RATES_BY_ITERATIONS.items()))
    budgets = sorted(by_budget)
    assert network_rate(space, matcher, 1) == by_budget[budgets[0]]
    assert network_rate(space, matcher) == by_budget[SELECTION_ITERATIONS]
    for low, high in zip(budgets, budgets[1:] + [10 * budgets[-1]], strict=True):
        assert network_rate(space, matcher, low) == by_budget[low]
        assert network_rate(space, matcher, high - 1) == by_budget[low]
    assert network_rate(space, matcher, 10 * budgets[-1]) == by_budget[budgets[-1]]
    for iterations in (1, *budgets, 10_000):
        assert network_rate("latent", "mtt", iterations) == UNSELECTED_NETWORK_RATE
    # the bundles' config check resolves auto with the run's iterations; an explicit rate is kept
    for iterations in budgets:
        out = check_distillation_config(
            **{**GOOD, "iterations": iterations}, latent_layer=2, lr_codes="auto", lr_network="auto"
        )
        assert out["lr_network"] == by_budget[iterations]
        assert out["lr_codes"] == DEFAULT_LEARNING_RATES[(space, matcher)][0]
    given = check_distillation_config(**{**GOOD, "iterations": budgets[-1]}, latent_layer=2, lr_network=0.05)
    assert given["lr_network"] == 0.05


def _validation_results(path, iterations, accuracies, split="val"):
    """A latent_prior.py results file of SLFD network-rate rows: {row: [accuracy of each classifier]}."""
    rows = [
        {"row": row, "ipc": 10, "results": [{"backbone": "convnet", "accuracy": a} for a in accs]}
        for row, accs in accuracies.items()
    ]
    args = {"split": split, "iterations": iterations, "batch_real": 64, "dataset": "custom", "matcher": "dm"}
    path.write_text(json.dumps({"args": {**args, "data_dir": str(path.with_suffix(".npz"))}, "rows": rows}))
    return str(path)


def test_learning_rates_are_selected_per_budget(tmp_path):
    """select_learning_rates.py compares results of one budget only: two budgets with opposite winners give one
    network rate each, named by the budget; a test-split file is refused."""
    script = [sys.executable, str(REPO / "benchmarks" / "select_learning_rates.py")]
    files = [
        _validation_results(
            tmp_path / "a200.json", 200, {"slfd:L2:net=0.001": [0.40, 0.42], "slfd:L2:net=0.01": [0.5]}
        ),
        _validation_results(tmp_path / "b200.json", 200, {"slfd:L2:net=0.001": [0.70], "slfd:L2:net=0.01": [0.72]}),
        _validation_results(tmp_path / "a600.json", 600, {"slfd:L2:net=0.001": [0.55], "slfd:L2:net=0.01": [0.45]}),
    ]
    out = tmp_path / "chosen.json"
    subprocess.run([*script, *files, "--out", str(out)], check=True, capture_output=True, text=True)
    chosen = json.loads(out.read_text())["chosen"]
    network = {(e["iterations"], e["space"], e["matcher"]): e["lr_network"] for e in chosen if "lr_network" in e}
    assert network == {(200, "feature", "dm"): 0.01, (600, "feature", "dm"): 0.001}
    assert all(e["batch_real"] == 64 for e in chosen)
    grid = next(e["grid"] for e in chosen if e["iterations"] == 200)
    assert grid["0.01"]["datasets"] == 2  # the two datasets of the budget, and not the other budget's file
    test_split = _validation_results(tmp_path / "t.json", 600, {"slfd:L2": [0.5]}, split="test")
    refused = subprocess.run([*script, test_split, "--out", str(out)], capture_output=True, text=True)
    assert refused.returncode != 0 and "choose defaults on 'val' only" in refused.stderr


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
        ("init", "zeros"),
        ("hidden_channels", 0),
        ("decode_chunk", -1),
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


def test_a_latent_layer_the_generator_lacks_fails_before_pretraining(tmp_path):
    """The default 28 px autoencoder has decoder layers 1..4; layer 7 is refused at once, not after pretraining."""
    from monai_pld.data import ImageSet
    from monai_pld.workflows.builders import build_generator

    data = ImageSet(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["a", "b"], "tiny")
    with pytest.raises(ConfigError, match="latent_layer"):
        build_generator("slfd", data, tmp_path / "g.pt", device="cpu", latent_layer=7, steps=10_000)
    assert not (tmp_path / "g.pt").exists()
