"""Every MONAI macro in the bundles points at a literal value: MONAI resolves one level of `%file#key` only, so a
macro whose target is itself a macro reaches the workflow as an unresolved string."""

import re

import pytest
import yaml
from helpers import REPO

BUNDLE_FILES = sorted((REPO / "bundles").glob("*/*.yaml")) + sorted((REPO / "bundles").glob("*/presets/*.yaml"))


def _raw(path: str, key: str):
    value = yaml.safe_load((REPO / path).read_text())
    for part in re.split(r"#|::", key):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _macros(value, where):
    if isinstance(value, str) and value.startswith("%"):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _macros(v, f"{where}#{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _macros(v, f"{where}#{i}")


def _contains_macro(value) -> bool:
    if isinstance(value, str):
        return value.startswith("%")
    if isinstance(value, dict):
        return any(_contains_macro(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_macro(v) for v in value)
    return False


@pytest.mark.parametrize("path", BUNDLE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_macro_points_at_a_macro(path):
    for where, macro in _macros(yaml.safe_load(path.read_text()), path.name):
        target_file, key = re.split(r"#|::", macro[1:], maxsplit=1)
        assert (REPO / target_file).is_file(), f"{where}: {macro} names a missing file"
        target = _raw(target_file, key)
        assert not _contains_macro(target), f"{where}: {macro} points at another macro ({target!r:.80})"


@pytest.mark.parametrize("path", BUNDLE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_macros_name_their_targets(path):
    """No macro counts list positions (``...#handlers#0``): inserting an item would shift every later one."""
    for where, macro in _macros(yaml.safe_load(path.read_text()), path.name):
        parts = re.split(r"#|::", macro[1:])[1:]
        assert not any(part.isdigit() for part in parts), f"{where}: {macro} points at a list position"


@pytest.mark.parametrize("bundle", ("pathmnist", "cifar10", "imagenet_subsets", "custom"))
def test_each_bundle_uses_every_shared_handler_by_name(bundle):
    shared = yaml.safe_load((REPO / "bundles" / "common" / "distillation.yaml").read_text())["handlers"]
    handlers = yaml.safe_load((REPO / "bundles" / bundle / "train.yaml").read_text())["train"]["handlers"]
    expected = [f"%bundles/common/distillation.yaml#handlers#{name}" for name in shared]
    # MLflow last: the exporter logs into its run before the handler closes it
    assert handlers == expected + ["@train#mlflow"]


def test_pretraining_bundles_resolve_every_generator_key():
    from monai.bundle import ConfigParser

    for bundle in ("pathmnist", "cifar10", "imagenet_subsets", "custom"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "pretrain_generator.yaml"))
        settings = parser.get_parsed_content("generator_settings")
        assert isinstance(settings["steps"], int) and settings["augment"] in ("flip", "none"), (bundle, settings)
        path = parser.get_parsed_content("generator_path")
        assert not str(path).startswith("%") and str(path).endswith("_autoencoderkl.pt"), (bundle, path)
