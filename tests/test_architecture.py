"""The package's layering, checked on the source (no imports run): the `lseg.*` import graph, module-level
and function-level imports alike (imports under ``if TYPE_CHECKING:`` are left out, they never run).

* no import cycle among `lseg` modules (a function-level import only hides one);
* the library (anything outside `lseg.cli`, `lseg.app` included) never imports `lseg.cli`;
* no module imports a ``_private`` name of another `lseg` module: what is shared is public;
* layers only point down: cli -> app / train / evaluate -> predictor / pipelines -> model / processing /
  data / inference / features -> images / files / labels / errors (`LAYERS`).

A package's ``__init__`` counts as importing the submodules it re-exports, and ``from lseg.pkg import
name`` as importing ``lseg.pkg.name`` when that is a submodule, else ``lseg.pkg``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import lseg

SOURCE = Path(lseg.__file__).resolve().parent


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # an lseg module
    names: tuple[str, ...]  # names taken from it (`from m import a, b`); () for `import m`
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """Absolute module of `from ... import`, relative forms included."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk_runtime(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and type_checking_only(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), str(MODULES[module]))
    found = []
    for node in walk_runtime(tree):
        if isinstance(node, ast.Import):
            found += [
                Import(module, alias.name, (), node.lineno) for alias in node.names if alias.name in MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if target not in MODULES:
                continue
            plain = []
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    found.append(Import(module, submodule, (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(module, target, tuple(plain), node.lineno))
    return found


IMPORTS = [i for module in MODULES for i in imports_of(module)]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for i in IMPORTS:
        if i.importer != i.imported:
            edges[i.importer].add(i.imported)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def test_the_walk_sees_function_level_imports_and_skips_type_checking_ones():
    demo = {i.imported for i in IMPORTS if i.importer == "lseg.app.demo"}
    assert "lseg.labels" in demo  # imported inside predict()
    assert "lseg.model.lseg" not in demo  # under `if TYPE_CHECKING:`
    assert "lseg.model.lseg" in {i.imported for i in IMPORTS if i.importer == "lseg.model"}  # re-export


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_cli():
    bad = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if i.imported.startswith("lseg.cli") and not i.importer.startswith("lseg.cli")
    ]
    assert not bad, "the library imports the CLI:\n" + "\n".join(bad)


def test_no_module_imports_private_names_of_another():
    bad = [
        f"{i.importer}:{i.line} imports {i.imported}.{name}"
        for i in IMPORTS
        for name in i.names
        if name.startswith("_") and not name.startswith("__") and i.imported != i.importer
    ]
    private_modules = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if any(part.startswith("_") and not part.startswith("__") for part in i.imported.split("."))
    ]
    bad += private_modules
    assert not bad, (
        "private names imported from other modules (make them public or move them):\n" + "\n".join(bad)
    )


def builds_confusion_matrix(tree: ast.AST) -> list[int]:
    """Lines importing torchmetrics or counting ``bincount(a * n + b)``: a confusion matrix built."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(name.split(".")[0] == "torchmetrics" for name in names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "bincount"
        ):
            arg = node.args[0] if node.args else None
            if (
                isinstance(arg, ast.BinOp)
                and isinstance(arg.left, ast.BinOp)
                and isinstance(arg.left.op, ast.Mult)
            ):
                lines.append(node.lineno)
    return sorted(lines)


def test_only_the_scoring_core_builds_confusion_matrices():
    assert builds_confusion_matrix(
        ast.parse("torch.bincount(t * n + p)\nfrom torchmetrics import Metric")
    ) == [1, 2]
    bad = [
        f"{module}:{line}"
        for module, path in MODULES.items()
        if module != "lseg.evaluate.metrics"
        for line in builds_confusion_matrix(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not bad, "confusion matrices built outside lseg.evaluate.metrics:\n" + "\n".join(bad)


# Top-level units of `lseg` by layer, highest first; a unit imports only units of its layer or below.
LAYERS = (
    {"cli"},
    {"app", "train", "evaluate"},
    {"predictor", "pipelines", "lseg"},  # "lseg": the package itself, re-exporting `lseg.pipeline`
    {"model", "processing", "data", "inference", "features", "export", "visualize", "shard"},
    {"images", "files", "labels", "errors", "device", "precision", "version", "distributed"},
)
# The one upward edge, by design: `LSeg.segment` / `LSeg.encode_image` are one-line conveniences over
# the predictor (imported inside those methods).
UPWARD = {("lseg.model.lseg", "lseg.predictor")}


def unit(module: str) -> str:
    """`lseg.evaluate.runner` -> "evaluate"; the package itself (its re-exports) is "lseg"."""
    return module.split(".")[1] if "." in module else "lseg"


def test_layers_only_point_down():
    level = {name: depth for depth, names in enumerate(LAYERS) for name in names}
    units = {unit(module) for module in MODULES}
    assert units <= set(level), f"give these modules a layer in LAYERS: {sorted(units - set(level))}"
    bad = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if level[unit(i.imported)] < level[unit(i.importer)] and (i.importer, i.imported) not in UPWARD
    ]
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)
