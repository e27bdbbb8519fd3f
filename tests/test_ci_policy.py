"""The suite's own promises: under CI=true a skip is a failure (unless it needs hardware CI never has), and
every data path resolves like the library's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

_CASES = '''
import pytest

def test_needs_data():
    pytest.skip("needs data that is missing")

@pytest.mark.needs_hardware
def test_needs_gpu():
    pytest.skip("no GPU here")

def test_runs():
    assert True
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(_CASES)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    # The project's conftest loaded as a plugin into a run over a scratch test file.
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
         str(tmp_path / "test_cases.py")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )


def test_a_skip_fails_under_ci_but_not_elsewhere(tmp_path):
    ci = _run(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 passed, 1 skipped" in ci.stdout and "test_needs_data" in ci.stdout
    assert "skipped under CI=true (Skipped: needs data that is missing)" in " ".join(ci.stdout.split())
    local = _run(tmp_path, None)
    assert local.returncode == 0 and "1 passed, 2 skipped" in local.stdout, local.stdout


def test_data_paths_resolve_like_the_library(monkeypatch, tmp_path):
    from hardmine.datasets import FASHION_MNIST_DIR, fashion_mnist_dir, load_fashion_mnist

    monkeypatch.delenv("HARDMINE_FASHION_MNIST", raising=False)
    assert fashion_mnist_dir() == FASHION_MNIST_DIR
    monkeypatch.setenv("HARDMINE_FASHION_MNIST", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path and fashion_mnist_dir("/x") == Path("/x")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):  # the library looks where the tests look
        load_fashion_mnist("train")
    # No test hard-codes the Debian folder: they ask fashion_mnist_dir().
    for f in set(TESTS.glob("test_*.py")) - {Path(__file__).resolve()}:
        assert "/usr/share/datasets" not in f.read_text(), f.name


def test_data_install_fails_loudly_when_the_data_cannot_be_had(tmp_path):
    script = TESTS.parent / "scripts" / "install_data.sh"
    env = {**os.environ, "HARDMINE_FASHION_MNIST": str(tmp_path / "empty")}
    res = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and "HARDMINE_FASHION_MNIST" in res.stderr and "dataset-fashion-mnist" in res.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert subprocess.run(["sh", str(script)], env=env, timeout=60).returncode == 0  # present: nothing to do
