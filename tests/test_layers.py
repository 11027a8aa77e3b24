"""The package's shape: imports flow one way (import-linter's layers contract in pyproject.toml,
function-local imports counted) and no module imports kiln inside a function outside cli/
unless a comment on that line says why (start-up time, an optional heavy dependency)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _local_kiln_imports(path: Path) -> list[str]:
    src = path.read_text()
    lines = src.splitlines()
    found = []
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kiln") and node.level == 0:
                    text = " ".join(lines[node.lineno - 1:node.end_lineno])
                    if "#" not in text:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    return found


def test_function_local_kiln_imports_only_in_cli_or_with_a_reason():
    offenders = [hit for path in sorted((ROOT / "kiln").rglob("*.py")) if "cli" not in path.parts
                 for hit in _local_kiln_imports(path)]
    assert not offenders, "hoist these to the module's top, or say why on the line:\n" + "\n".join(offenders)
