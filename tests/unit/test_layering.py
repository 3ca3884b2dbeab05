"""The seams between packages: dependencies point one way and drafter kinds are known in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_deepspec_never_imports_data_tools():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted((ROOT / "deepspec").rglob("*.py"))
                 for m in _imports(p) if m == "data_tools" or m.startswith("data_tools.")]
    assert offenders == [], "data_tools implements deepspec's interfaces, never the reverse"


def test_drafter_kinds_are_compared_only_in_the_registry():
    kind = re.compile(r'[!=]= "(eagle3|dflash|dspark)"')
    offenders = [f"{p.relative_to(ROOT)}:{i}" for pkg in ("deepspec", "data_tools")
                 for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "registry.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if kind.search(line)]
    assert offenders == [], "ask deepspec.drafters.registry.kind_entry(...) instead of comparing kind names"


def test_the_feature_interface_is_implemented_by_data_tools():
    import data_tools  # noqa: F401  (registers the provider)
    from data_tools import features as impl
    from deepspec import features

    assert impl.SequenceFeatures is features.SequenceFeatures  # one class on both sides
    assert features._PROVIDER == "data_tools.features:open_feature_splits"
