"""The packages depend one way: entry points -> stages -> trainer/services -> shared core."""

import ast
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

# Each package may import itself and the packages listed; nothing else of prodcat's.
ALLOWED = {
    "core": set(),
    "services": {"core"},
    "trainer": {"core"},
    "pipelines": {"core", "services", "trainer"},
    "entrypoints": {"core", "services", "trainer", "pipelines"},
    "dags": {"entrypoints", "core"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level prodcat packages that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in ALLOWED)
    return found


def test_imported_packages_finds_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import core.config\n\ndef f():\n    from trainer import train\n    import json\n")
    assert imported_packages(module) == {"core", "trainer"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package):
    violations = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: bad for path, bad in violations.items() if bad} == {}
