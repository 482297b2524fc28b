import importlib.util
from pathlib import Path

from helpers import REPO


def _comparison():
    spec = importlib.util.spec_from_file_location("comparison", REPO / "benchmarks" / "comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_files_keep_a_dot_in_the_stem():
    """Two runs named after their settings (``..._lr0.001_s0`` and ``..._lr0.001_s1``) must not write one file."""
    output_file = _comparison().output_file
    assert output_file(Path("runs/a_net0.001_s0"), ".json") == Path("runs/a_net0.001_s0.json")
    assert output_file(Path("runs/a_net0.001_s0"), ".json") != output_file(Path("runs/a_net0.001_s1"), ".json")
    assert output_file(Path("runs/a.json"), ".md") == Path("runs/a.md")
    assert output_file(Path("runs/a"), "_ablation.json") == Path("runs/a_ablation.json")
