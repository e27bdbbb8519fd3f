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
                "manifest", "sampler", "online", "loaders", "zoo", "factored", "attribution", "tokens"):
        m = importlib.import_module(f"hardmine.{mod}")
        for name in m.__all__:
            assert hasattr(m, name), f"hardmine.{mod}.{name}"


def test_version_cli_and_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hardmine", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hardmine.__version__


def test_the_cli_and_the_package_start_without_heavy_imports():
    # `hardmine --help` / `hardmine version` must start fast: nothing heavy is imported before a command needs it
    # (the start-up time itself is measured, not asserted: speed lives in benchmarks).
    import subprocess
    import sys

    code = (
        "import sys, atexit\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'numpy', 'pandas', 'faiss', 'pyarrow') "
        "if m in sys.modules), file=sys.stderr))\n"
        "sys.argv = ['hardmine', '--help']\n"
        "import hardmine.cli\n"
        "hardmine.cli.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "scan" in out.stdout, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr


def test_lazy_names_resolve_and_scan_stays_the_function():
    import subprocess
    import sys

    code = (
        "import hardmine\n"
        "from hardmine.scan import Scan\n"  # importing the package first must not replace the function
        "assert callable(hardmine.scan) and hardmine.scan.__name__ == 'scan', hardmine.scan\n"
        "import hardmine.scan.driver\n"
        "assert hardmine.scan.__module__ == 'hardmine.scan.driver', hardmine.scan\n"
        "assert hardmine.GradientExtractor.__name__ == 'GradientExtractor'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
