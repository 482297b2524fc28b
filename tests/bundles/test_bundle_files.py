"""Every dataset bundle has the same files, every config parses with MONAI's ``ConfigParser``, every ``@`` reference
in it points at an existing id, and the ids that the documented commands override exist. Nothing is run: CIFAR-10
and ImageNet are not available here."""

import json
import re
import shlex
from ast import literal_eval

import pytest
from helpers import REPO
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

BUNDLE_FILES = (
    "train.yaml",
    "evaluate.yaml",
    "export.yaml",
    "pretrain_generator.yaml",
    "train_experts.yaml",
    "metadata.json",
    "logging.conf",
    "README.md",
)
CONFIGS = [name for name in BUNDLE_FILES if name.endswith(".yaml")]
DATASET_BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if p.is_dir() and p.name != "common")
# where commands are documented: READMEs, the docs a user follows, and the header comment of each config
DOCUMENTS = (
    [REPO / "README.md", REPO / "docs" / "configuration.md", REPO / "docs" / "data-sharing.md"]
    + sorted((REPO / "bundles").glob("*/README.md"))
    + sorted((REPO / "bundles").glob("*/*.yaml"))
)


def _parser(config_files) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in config_files])
    meta = (REPO / config_files[0]).parent / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    return parser


def test_the_dataset_bundles_are_the_four_documented_ones():
    assert DATASET_BUNDLES == ["cifar10", "custom", "imagenet_subsets", "pathmnist"]


@pytest.mark.parametrize("bundle", DATASET_BUNDLES)
def test_every_dataset_bundle_has_the_same_files(bundle):
    folder = REPO / "bundles" / bundle
    missing = [name for name in BUNDLE_FILES if not (folder / name).is_file()]
    assert not missing, f"bundles/{bundle} lacks {missing}"
    meta = json.loads((folder / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version"):
        assert key in meta, f"bundles/{bundle}/metadata.json lacks {key}"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bundle", DATASET_BUNDLES)
def test_config_parses_and_every_reference_resolves(bundle, config, monkeypatch):
    monkeypatch.chdir(REPO)  # macros name files relative to the repository root
    parser = _parser([f"bundles/{bundle}/{config}"])
    parser.parse()
    items = parser.ref_resolver.items
    assert parser.get_parsed_content("bundle_root") == f"bundles/{bundle}"
    for name in ("imports", "run", "initialize"):
        assert name in items, f"{config}: no '{name}'"
    for item_id, item in items.items():
        value = item.get_config()
        if not isinstance(value, str):
            continue
        assert not value.startswith("%"), f"{bundle}/{config}#{item_id}: unresolved macro {value}"
        for ref in ReferenceResolver.match_refs_pattern(value):
            assert ref in items, f"{bundle}/{config}#{item_id} refers to the missing id '{ref}'"


@pytest.mark.parametrize("bundle", DATASET_BUNDLES)
def test_every_bundle_takes_the_shared_defaults_and_build_trainer(bundle, monkeypatch):
    """No dataset bundle takes a value from another dataset bundle; every default they share comes from
    bundles/common/defaults.yaml, and the distillation trainer is the one build_trainer scripts call."""
    monkeypatch.chdir(REPO)
    for config in CONFIGS:
        text = (REPO / "bundles" / bundle / config).read_text()
        others = set(re.findall(r"%bundles/([a-z0-9_]+)/", text)) - {bundle, "common"}
        assert not others, f"bundles/{bundle}/{config} takes values from {others}"
    parser = _parser([f"bundles/{bundle}/train.yaml"])
    parser.parse()  # expands the macros
    assert parser.get("train#trainer#_target_") == "monai_pld.workflows.build_trainer"
    defaults = _parser(["bundles/common/defaults.yaml"])
    for key in ("rank", "lr_codes", "optimizer", "generator_lr", "tracking_uri", "latent_layer"):
        assert parser.get(key) == defaults.get(key), key


def _documented_commands():
    """(where, config files, override ids) of every `python -m monai.bundle run` line in the documents."""
    found = []
    for doc in DOCUMENTS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # continuation lines
        variables = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.lstrip("# ").strip()
            assignment = re.fullmatch(r"([A-Z]+)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            start = line.find("python -m monai.bundle run")
            if start < 0:
                continue
            command = line[start:].split("`")[0]
            for name, value in variables.items():
                command = command.replace(f"${name}", value)
            words = shlex.split(command, comments=True)[4:]
            if "--config_file" not in words:
                continue
            config = words[words.index("--config_file") + 1]
            files = literal_eval(config) if config.startswith("[") else [config]
            ids = [w[2:] for w in words if w.startswith("--") and w != "--config_file"]
            found.append((f"{doc.relative_to(REPO)}:{number}", files, ids))
    return found


COMMANDS = _documented_commands()


def test_commands_are_found_for_every_bundle_and_config():
    named = {files[0] for _, files, _ in COMMANDS}
    for bundle in DATASET_BUNDLES:
        for config in CONFIGS:
            assert f"bundles/{bundle}/{config}" in named, f"no documented command runs bundles/{bundle}/{config}"


@pytest.mark.parametrize("where,files,ids", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_names_existing_files_and_ids(where, files, ids, monkeypatch):
    monkeypatch.chdir(REPO)
    files = [name for name in files if name.startswith("bundles/")]  # not a user's own file (my_generator.yaml)
    for name in files:
        assert (REPO / name).is_file(), f"{where}: {name} does not exist"
    parser = _parser(files)
    for key in ids:
        assert key.replace("#", "::") in parser, f"{where}: --{key} is not an id of {files}"
