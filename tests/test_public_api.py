"""The public surface is exactly what __all__ says, and every name in it exists."""

import importlib

import hardmine

EXPECTED = set(hardmine.__all__)


def test_all_names_exist_and_are_unique():
    assert len(hardmine.__all__) == len(EXPECTED)
    for name in hardmine.__all__:
        assert hasattr(hardmine, name), name


def test_no_public_name_outside_all():
    public = {n for n in vars(hardmine) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(hardmine, n), type(importlib))}
    assert public - modules - {"annotations", "logging"} <= EXPECTED | {"__version__"}


def test_submodule_all_are_consistent():
    for mod in ("extract", "project", "params", "losses", "datasets", "enums", "engine", "scan", "score", "index",
                "manifest", "sampler", "online", "loaders", "zoo", "factored", "attribution"):
        m = importlib.import_module(f"hardmine.{mod}")
        for name in m.__all__:
            assert hasattr(m, name), f"hardmine.{mod}.{name}"


def test_version_cli_and_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hardmine", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hardmine.__version__
