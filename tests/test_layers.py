"""The layers point down the data flow: store imports nothing above it; rules never import the receiver, the
exporter, the admin server or the commands (docs: the store is the one writer; the outbox table is the store's)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "evaluator"
FORBIDDEN = {
    "store": ("evaluator.receiver", "evaluator.rules", "evaluator.exporter", "evaluator.admin", "evaluator.commands",
              "evaluator.postmortem", "evaluator.daemon"),
    "rules": ("evaluator.receiver", "evaluator.exporter", "evaluator.admin", "evaluator.commands",
              "evaluator.postmortem", "evaluator.daemon"),
    "stats": ("evaluator.receiver", "evaluator.rules", "evaluator.store", "evaluator.exporter", "evaluator.commands"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


def test_no_package_imports_a_layer_above_it() -> None:
    wrong = []
    for package, above in FORBIDDEN.items():
        for path in sorted((PACKAGE / package).rglob("*.py")):
            wrong += [f"{path.relative_to(PACKAGE.parent)} imports {m}" for m in _imports(path)
                      if m.startswith(above)]
    assert wrong == []


def test_the_check_finds_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from evaluator.receiver.columns import SpanColumns\nimport evaluator.exporter.outbox\n")
    assert _imports(bad) == ["evaluator.receiver.columns", "evaluator.exporter.outbox"]
