"""Numbers in the README and docs are the ones the scripts wrote: every included results block matches its
file, and no measured figure is typed into prose outside a generated block."""

import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _updater():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_match_results_files():
    mod = _updater()
    readme = (ROOT / "README.md").read_text()
    assert mod.PATTERN.findall(readme), "README includes no results block"
    docs = mod.documents()
    assert ROOT / "docs" / "benchmarks.md" in docs
    for path in docs:
        text = path.read_text()
        assert mod.render(text) == text, f"{path.name} differs from scripts/results/*.md: run scripts/update_readme.py"


# A measured-looking figure: a ratio (0.84x, 1.3×), a figure with two or more decimals (0.969), a measured
# spread (0.91 ± 0.02, ±0.4, ±4 points, ±4–17 %). A sign in maths ("multiplying by ±1") is not a figure.
_FIGURE = re.compile(
    r"\d+(\.\d+)?\s?[x×](?![A-Za-z0-9_])|\b\d+\.\d{2,}\b|\d\s?±\s?\d|±\s?\d+\.\d"
    r"|±\s?\d+(\s?[–-]\s?\d+)?\s?(points|%)"
)


def _prose(text: str) -> str:
    """The hand-written text: generated blocks, fenced code and inline code removed."""
    text = _updater().PATTERN.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_no_measured_figure_is_typed_into_prose():
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        if not page.exists():
            continue
        for line in _prose(page.read_text()).splitlines():
            m = _FIGURE.search(line)
            assert m is None, f"{page.name}: {m.group(0)!r} in {line.strip()!r}: produce it from a script in scripts/"
    score_doc = importlib.import_module("hardmine.score").__doc__
    assert not re.search(r"AUROC\s+\d", score_doc), "hardmine/score.py quotes an AUROC: cite the results file instead"


def test_the_prose_check_catches_a_typed_figure():
    for line in ("the transformer measured 0.79x", "ratio 0.85× here", "AUROC 0.969 vs 0.987", "±4 points",
                 "moves by ±4–17 points", "0.91 ± 0.02", "±0.4 AUROC"):
        assert _FIGURE.search(_prose(line)), line
    for line in ("batch 256, 2 cores", "momentum 0.9", "`--top 0.05`", "torch `2.13.0`", "dividing by ±1 instead"):
        assert not _FIGURE.search(_prose(line)), line


def test_readme_names_the_two_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
