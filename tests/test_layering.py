"""The package's imports run one way: from the layers of :data:`LAYERS` downwards, never in a cycle, never hidden in
a function.

A static walk over the source (no module is imported): every ``import`` and ``from ... import`` at any depth, relative
ones resolved. A unit is a top-level module or subpackage of ``monai_pld`` (``monai_pld`` itself is the package's
``__init__``). The deprecated aliases in :data:`SHIMS` re-export names from their new homes, which may lie above them;
they are no layer, so nothing in the package may import them and their own imports are not checked.
"""

import ast
from pathlib import Path

import pytest

import monai_pld

PACKAGE_DIR = Path(monai_pld.__file__).resolve().parent

# lowest first; a unit may import units of its own layer or of a lower one
LAYERS = (
    ("monai_pld", "monai_pld.bundle_errors", "monai_pld.defaults", "monai_pld.distributed"),
    ("monai_pld.utils",),
    ("monai_pld.augment", "monai_pld.data"),
    ("monai_pld.networks", "monai_pld.parameterizations"),  # classifiers and generators; the distilled set's slots
    ("monai_pld.formats",),
    ("monai_pld.matching",),
    ("monai_pld.evaluation",),
    ("monai_pld.handlers",),
    ("monai_pld.engines",),
    ("monai_pld.sharing",),
    ("monai_pld.workflows",),
)
SHIMS = frozenset(
    {
        "monai_pld.builders",
        "monai_pld.engines.evaluation",
        "monai_pld.export",
        "monai_pld.export.package",
        "monai_pld.export.privacy",
        "monai_pld.networks.latent_distribution",
        "monai_pld.networks.real_images",
    }
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def unit_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def project_imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """Every project module ``module`` imports: ``(target, line, inside a function or class)``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:  # ``from monai_pld import distributed`` imports the module
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, child.lineno, nested))
            visit(child, inner)

    visit(ast.parse(source), False)
    return [(t, line, nested) for t, line, nested in found if t == "monai_pld" or t.startswith("monai_pld.")]


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, list[tuple[str, int, bool]]]:
    modules = package_modules(root)
    known = set(modules)
    return {
        name: project_imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node, or a node that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def unit_graph(graph: dict[str, list[tuple[str, int, bool]]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, imports in graph.items():
        if module in SHIMS:
            continue
        source = unit_of(module)
        units.setdefault(source, set()).update(unit_of(t) for t, _, _ in imports if unit_of(t) != source)
    return units


def test_the_cycle_detector_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_walk_sees_relative_and_nested_imports():
    source = "from .base import X\nfrom monai_pld import utils\n\ndef f():\n    import monai_pld.data.base\n"
    known = {"monai_pld.utils", "monai_pld.data.base"}
    found = project_imports(source, "monai_pld.data.custom", False, known)
    assert found == [("monai_pld.data.base", 1, False), ("monai_pld.utils", 2, False), ("monai_pld.data.base", 5, True)]


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in package_modules() if m not in SHIMS}
    assert units - set(LAYER_OF) == set(), "add the new module or subpackage to LAYERS"
    assert set(LAYER_OF) - units == set(), "LAYERS names a unit that no longer exists"


def test_no_import_cycle_between_units():
    assert find_cycles(unit_graph(import_graph())) == []


def test_no_import_cycle_between_modules():
    graph = import_graph()
    modules = {m: {t for t, _, _ in imports if t != m} for m, imports in graph.items() if m not in SHIMS}
    assert find_cycles(modules) == []


def test_no_project_import_inside_a_function():
    nested = [f"{m}:{line} imports {t}" for m, imports in import_graph().items() for t, line, inner in imports if inner]
    assert nested == []


def test_imports_follow_the_layer_order():
    wrong = []
    for module, imports in import_graph().items():
        if module in SHIMS:
            continue
        level = LAYER_OF[unit_of(module)]
        for target, line, _ in imports:
            if target in SHIMS or unit_of(target) in SHIMS:
                wrong.append(f"{module}:{line} imports the deprecated alias {target}")
            elif LAYER_OF[unit_of(target)] > level:
                wrong.append(f"{module}:{line} imports {target}, a higher layer")
    assert wrong == []


@pytest.mark.parametrize("module", sorted(SHIMS))
def test_the_deprecated_aliases_still_import(module):
    __import__(module)
