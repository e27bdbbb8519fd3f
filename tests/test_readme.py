"""Numbers in the README are the ones the scripts wrote: every included results block matches its file."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_results_files():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    blocks = mod.PATTERN.findall(readme)
    assert blocks, "README includes no results block"
    assert mod.render(readme) == readme, "README tables differ from scripts/results/*.md: run scripts/update_readme.py"


def test_readme_names_the_two_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
