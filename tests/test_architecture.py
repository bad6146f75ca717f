"""The package's layering, read from the import statements of every module (no module is imported).

Data flows one way (CONTRIBUTING.md): the top-level modules (embodiment, layout, normalization, text,
inference record, processor, ...) -> ``data/`` -> ``model/`` -> ``inference/``, with ``training/``,
``checkpoints/``, ``sim/`` and the CLI above. A module may import from its own layer or below, never
from above.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cosmos_policy_lightning"
NAME = "cosmos_policy_lightning"

#: Layers, lowest first. Top-level modules (and the package root) are layer 0.
LAYERS = {"data": 1, "model": 2, "checkpoints": 3, "inference": 4, "training": 4, "sim": 5}
#: Top-level modules above everything (the command line).
ENTRY_POINTS = {"cli"}


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """Fully qualified names of the package's modules that ``path`` imports (at any depth, lazy
    imports inside functions included)."""
    tree = ast.parse(path.read_text())
    module = _module_name(path, package_root).split(".")
    package = module if path.name == "__init__.py" else module[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import schema`` names a module; ``from .x import f`` names x.
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith(NAME + ".")}
    return found


def _layer(qualified: str) -> int:
    parts = qualified.split(".")[1:]
    if parts and parts[0] in ENTRY_POINTS:
        return 9
    return LAYERS.get(parts[0], 0) if parts else 0


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_its_own(path):
    own = _layer(_module_name(path))
    above = sorted(i for i in _imports(path) if _layer(i) > own)
    assert not above, f"{path.relative_to(PACKAGE)} (layer {own}) imports from above its layer: {above}"


def test_no_module_under_data_imports_the_model():
    offenders = {str(p.relative_to(PACKAGE)): sorted(i for i in _imports(p) if i.startswith(f"{NAME}.model"))
                 for p in (PACKAGE / "data").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_shard_reader_does_not_import_the_converter():
    for name in ("datamodule.py", "dataset_info.py", "stages.py", "latent_cache.py", "integrity.py"):
        imported = _imports(PACKAGE / "data" / name)
        assert not any(i.startswith(f"{NAME}.data.convert") for i in imported), (name, imported)


def test_the_layering_check_sees_a_violation(tmp_path):
    """The check itself can fail: a (lazy) import of the model inside a data module is found."""
    fake = tmp_path / NAME / "data" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..model.module import CosmosPolicyModule\n")
    name = _module_name(fake, tmp_path / NAME)
    assert name == f"{NAME}.data.probe" and _layer(name) == 1
    assert [i for i in _imports(fake, tmp_path / NAME) if _layer(i) > 1] == [f"{NAME}.model.module"]


def test_tests_mirror_the_packages_and_share_only_fixtures():
    """Every subpackage has its test folder; a test file imports helpers from ``tests/fixtures`` (or the
    conftest), never from another test file."""
    tests = Path(__file__).resolve().parent
    for package in LAYERS:
        assert (tests / package / "__init__.py").is_file(), f"tests/{package}/ missing"
    offenders = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module and \
                    node.module.split(".")[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(tests)} imports {node.module}")
    assert not offenders, offenders


#: Import cycles not removed yet, each with where it is left (the test fails on any other).
KNOWN_CYCLES: set[frozenset[str]] = set()  # none: keep it so


def _cycles(modules: list[Path], package_root: Path = PACKAGE) -> list[frozenset[str]]:
    """The strongly connected components of more than one module of the import graph (lazy imports included)."""
    names = {_module_name(p, package_root): p for p in modules}
    graph = {m: sorted(i for i in _imports(p, package_root) if i in names and i != m) for m, p in names.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    """No two modules import each other, directly or through others, even lazily inside a function."""
    cycles = [sorted(c) for c in _cycles(MODULES) if c not in KNOWN_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_sees_a_cycle(tmp_path):
    root = tmp_path / NAME
    (root / "model").mkdir(parents=True)
    (root / "model" / "a.py").write_text("from .b import x\n")
    (root / "model" / "b.py").write_text("def x():\n    from .a import y\n")
    (root / "model" / "c.py").write_text("from .a import y\n")
    assert _cycles(sorted(root.rglob("*.py")), root) == [frozenset({f"{NAME}.model.a", f"{NAME}.model.b"})]


def test_every_module_is_in_the_module_map():
    """CONTRIBUTING's "Where things are" table names every module (``data/sources/`` as one folder), so a
    newcomer finds each concept there."""
    table = "\n".join(line for line in (PACKAGE.parents[1] / "CONTRIBUTING.md").read_text().splitlines()
                      if line.startswith("|"))
    missing = [rel for rel in (p.relative_to(PACKAGE).as_posix() for p in MODULES)
               if not rel.endswith("__init__.py") and f"`{rel}`" not in table
               and not (rel.startswith("data/sources/") and "`data/sources/`" in table)]
    assert not missing, f"add to CONTRIBUTING.md's module map: {missing}"
