"""Imports point one way: commands -> train -> models -> layers -> ops -> kernels, with parallel beside.

The import statements of every module (lazy ones inside functions included) are parsed with ``ast``; an edge from a
lower layer to a higher one fails the test with the file and the imported module. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Subpackages of m2rnn_jax (and pallas_kernels) by layer: a module may import its own subpackage, leaves, and
# subpackages of a lower rank. Two subpackages of the same rank do not import each other.
RANKS: dict[str, int] = {
    "pallas_kernels": 0,
    "ops": 1,
    "m2rnn_jax": 1,  # the package root re-exports the ops
    "layers": 2,
    "models": 3,
    "data": 3,
    "train": 4,
    "interop": 5,
    "bench": 6,
    "commands": 7,
    "cli": 8,
    "__main__": 9,
}
# Modules that import nothing of the package and that every layer may use.
LEAVES = frozenset({"checks", "typing", "value_checks", "testing"})
# Beside the chain: used by ops and everything above; imports at most layers (context parallelism wraps mixers).
BESIDE = {"parallel": RANKS["layers"]}
UNITS = frozenset(RANKS) | LEAVES | frozenset(BESIDE)


def unit(module: str) -> str | None:
    """The architectural unit of a dotted module name: a subpackage of m2rnn_jax, pallas_kernels, experiments."""
    parts = module.split(".")
    if parts[0] == "m2rnn_jax":
        return parts[1] if len(parts) > 1 else "m2rnn_jax"
    if parts[0] in ("pallas_kernels", "experiments"):
        return parts[0]
    return None


def imported_modules(source: str) -> list[str]:
    """Absolute module names imported anywhere in ``source``; ``from m2rnn_jax import train`` counts as
    ``m2rnn_jax.train`` (a subpackage), ``from m2rnn_jax import m2rnn`` as the root (a re-exported name)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subpackages = [alias.name for alias in node.names if alias.name in UNITS]
            if node.module == "m2rnn_jax" and subpackages:
                names += [f"m2rnn_jax.{name}" for name in subpackages]
            else:
                names.append(node.module)
    return names


def wrong_way(source_unit: str, target_unit: str) -> bool:
    """True when a module of ``source_unit`` may not import ``target_unit``."""
    if target_unit == source_unit:
        return False
    if target_unit == "experiments" or source_unit in LEAVES:
        return True
    if source_unit == "m2rnn_jax":
        return target_unit != "ops"
    if target_unit in LEAVES:
        return source_unit == "pallas_kernels"
    if source_unit in BESIDE:
        return target_unit in BESIDE or RANKS[target_unit] > BESIDE[source_unit]
    if target_unit in BESIDE:
        return source_unit == "pallas_kernels"
    return RANKS[target_unit] >= RANKS[source_unit]


def wrong_way_edges(path: Path, module: str) -> list[str]:
    source_unit = unit(module)
    edges = set()
    for name in imported_modules(path.read_text()):
        target_unit = unit(name)
        if target_unit is not None and wrong_way(source_unit, target_unit):
            edges.add(f"{path.relative_to(REPO)}: {source_unit} imports {name}")
    return sorted(edges)


def package_modules() -> list[tuple[Path, str]]:
    paths = sorted((REPO / "m2rnn_jax").rglob("*.py")) + sorted((REPO / "pallas_kernels").rglob("*.py"))
    modules = [".".join(path.relative_to(REPO).with_suffix("").parts) for path in paths]
    return [(path, module.removesuffix(".__init__")) for path, module in zip(paths, modules)]


def test_every_unit_of_the_package_has_a_place():
    units = {unit(module) for _, module in package_modules()}
    assert units <= UNITS, units - UNITS


def test_imports_point_one_way():
    edges = [edge for path, module in package_modules() for edge in wrong_way_edges(path, module)]
    assert not edges, "imports against the layering:\n" + "\n".join(edges)


def test_tests_never_import_experiments():
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests").rglob("*.py"))
        if any(unit(name) == "experiments" for name in imported_modules(path.read_text()))
    ]
    assert not offenders, offenders


def test_the_checker_rejects_wrong_way_edges():
    assert wrong_way("ops", "layers") and wrong_way("models", "train") and wrong_way("pallas_kernels", "ops")
    assert wrong_way("parallel", "models") and wrong_way("checks", "ops") and wrong_way("bench", "commands")
    assert wrong_way("data", "models") and wrong_way("train", "experiments") and wrong_way("ops", "m2rnn_jax")
    assert not wrong_way("commands", "train") and not wrong_way("ops", "pallas_kernels")
    assert not wrong_way("ops", "parallel") and not wrong_way("parallel", "ops") and not wrong_way("layers", "checks")
    assert imported_modules("def f():\n    from m2rnn_jax.train import presets\n") == ["m2rnn_jax.train"]
    assert imported_modules("from m2rnn_jax import m2rnn, train") == ["m2rnn_jax.train"]
    assert imported_modules("from m2rnn_jax import m2rnn") == ["m2rnn_jax"]
