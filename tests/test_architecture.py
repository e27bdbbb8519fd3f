"""What ARCHITECTURE.md promises about the code's rooms, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hardmine"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in PKG.rglob("*.py"):
        for node in _imports(path):
            for alias in node.names:
                # Our own modules only (relative imports): torch's private classes are torch's business.
                if node.level >= 1 and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(PKG)}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    assert not found, "private names imported across modules (make them public or move them):\n" + "\n".join(found)


def test_stage_modules_do_not_import_the_doors():
    # The stages and shared modules sit below the doors (scan, online) and the CLI: nothing below imports above.
    stages = ["project", "index", "score", "slices", "label_issues", "manifest", "sampler", "batches", "checks",
              "enums", "params", "losses", "_io", "extract", "engine", "lm", "tokens"]
    above = {"scan", "online", "cli", "integrations", "attribution"}
    bad = []
    for name in stages:
        path = PKG / f"{name}.py"
        if not path.exists():
            continue
        for node in _imports(path):
            target = (node.module or "").split(".")[0]
            if node.level >= 1 and target in above:
                bad.append(f"{name}.py imports {'.' * node.level}{node.module}")
    assert not bad, bad


def test_every_room_named_in_architecture_md_exists():
    text = (PKG.parent / "ARCHITECTURE.md").read_text()
    for room in ("scan/", "online/", "factored/", "cli/", "integrations/", "loaders/"):
        assert room in text and (PKG / room.rstrip("/")).is_dir(), room
    for module in ("batches.py", "checks.py", "enums.py", "score.py", "manifest.py", "sampler.py", "index.py"):
        assert module in text and (PKG / module).is_file(), module
