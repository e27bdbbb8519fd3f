"""The `hardmine` CLI on real files made in the test: every model and data form, bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from models import MLP
from typer.testing import CliRunner

from hardmine.cli import app
from hardmine.manifest import REQUIRED_COLUMNS, read_manifest

TESTS = Path(__file__).parent
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _cwd_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _blobs(n=120, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, 4, n)
    x = g.normal(size=(n, 12)).astype(np.float32)
    x[np.arange(n), y] += 3.0
    return x, y


def train_and_save(directory):
    """A small MLP trained on blobs, saved as ``directory/model.pt`` (a state dict), plus the data as
    ``directory/data.npz`` (ids 1000..1119)."""
    x, y = _blobs()
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), directory / "model.pt")
    np.savez(directory / "data.npz", X=x, y=y, ids=np.arange(1000, 1000 + len(y)))
    return model.eval(), x, y


@pytest.fixture
def trained(tmp_path):
    """A small MLP trained on blobs, saved as a state dict, plus the data as .npz."""
    return train_and_save(tmp_path)


def _scan(tmp_path, *extra, data="data.npz", ckpt="model.pt", model="models:MLP", out="scan"):
    args = ["scan", tmp_path / ckpt, tmp_path / data if not str(data).count(":") else data, "--out", tmp_path / out,
            "--dim", "8", "--batch-size", "32", "--quiet"]
    if model:
        args += ["--model", model]
    return invoke(*args, *extra)


def test_scan_state_dict_npz_then_show_export_neighbors(tmp_path, trained):
    res = _scan(tmp_path, "--json", "--neighbor-scores")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == 120
    df = read_manifest(tmp_path / "scan")
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert sorted(df["sample_id"].tolist()) == list(range(1000, 1120))
    for name in ("manifest.parquet", "index.faiss", "scan.json"):
        assert (tmp_path / "scan" / name).exists()
    info = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert info["source"]["data_format"] == "npz"

    res = invoke("show", tmp_path / "scan", "--top", "5", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    res = invoke("show", tmp_path / "scan", "--top", "3", "--class", "2")
    assert res.exit_code == 0 and "hardest 3" in res.stdout
    # --class keeps that label only, hardest first: the JSON rows and the table's label column agree.
    m = read_manifest(tmp_path / "scan")
    want = m[m["label"] == 2].sort_values("rank")
    res = invoke("show", tmp_path / "scan", "--top", "500", "--class", "2", "--json")
    rows = json.loads(res.stdout)
    assert [r["sample_id"] for r in rows] == want["sample_id"].tolist() and {r["label"] for r in rows} == {2}
    res = invoke("show", tmp_path / "scan", "--top", "4", "--class", "2")
    shown = [line for line in res.stdout.splitlines() if any(str(i) in line.split() for i in want["sample_id"])]
    assert len(shown) == 4 and all(str(i) in res.stdout for i in want["sample_id"].head(4))
    assert not any(str(i) in res.stdout.split() for i in m.loc[m["label"] != 2, "sample_id"])
    res = invoke("show", tmp_path / "scan", "--class", "7")
    assert res.exit_code == 2 and "--class 7 is not a label" in " ".join(res.output.split())

    res = invoke("export", tmp_path / "scan", "--out", tmp_path / "default.parquet", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["strategy"] == "slices"  # the default for a classification scan
    exp = read_manifest(tmp_path / "default.parquet")
    assert exp.attrs["hardmine"]["export"]["strategy"] == "slices"
    per_class_mass = exp.groupby("label")["weight"].sum()
    assert np.allclose(per_class_mass, len(exp) / len(per_class_mass))  # class-balanced

    res = invoke("export", tmp_path / "scan", "--out", tmp_path / "over.parquet", "--strategy", "top-k", "--top", "0.1",
                 "--boost", "4")
    assert res.exit_code == 0, res.output
    exp = read_manifest(tmp_path / "over.parquet")
    assert int(exp["is_hard"].sum()) == 12 and len(exp) == 120
    hard, easy = exp.loc[exp["is_hard"], "weight"], exp.loc[~exp["is_hard"], "weight"]
    assert np.allclose(hard / easy.iloc[0], 4.0)

    res = invoke("neighbors", tmp_path / "scan", "--ids", "1000,1005", "-k", "4", "--json")
    assert res.exit_code == 0, res.output
    nb = json.loads(res.stdout)
    assert [e["sample_id"] for e in nb] == [1000, 1005]
    assert all(len(e["neighbors"]) == 4 and e["sample_id"] not in [r["sample_id"] for r in e["neighbors"]] for e in nb)
    res = invoke("neighbors", tmp_path / "scan", "--ids", "1000", "-k", "10", "--absolute", "--json")
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    m = read_manifest(tmp_path / "scan").set_index("sample_id")
    differ = np.mean([r["label"] != entry["label"] for r in entry["neighbors"]])
    assert differ == pytest.approx(m.loc[1000, "neighbor_disagreement"])  # the neighbours the score counted


def test_parquet_list_column_string_ids_and_csv_columns(tmp_path, trained):
    _, x, y = trained
    pd.DataFrame({"feat": list(x), "label": y, "uid": [f"img{i:03d}" for i in range(len(y))]}).to_parquet(
        tmp_path / "d.parquet", row_group_size=50
    )
    res = _scan(tmp_path, "--feature-column", "feat", "--id-column", "uid", data="d.parquet")
    assert res.exit_code == 0, res.output
    df = read_manifest(tmp_path / "scan")
    assert df["sample_id"].iloc[0].startswith("img") and len(df) == 120

    frame = pd.DataFrame(x, columns=[f"pix_{i}" for i in range(12)])
    frame["label"] = y
    frame.to_csv(tmp_path / "d.csv", index=False)
    res = _scan(tmp_path, "--feature-columns", "pix_*", "--input-shape", "12", data="d.csv", out="scan_csv")
    assert res.exit_code == 0, res.output
    csv_df = read_manifest(tmp_path / "scan_csv")
    # Same samples and model -> same losses whatever the file format.
    np.testing.assert_allclose(csv_df.sort_values("sample_id")["loss"].to_numpy(),
                               df.assign(i=range(120)).sort_values("i")["loss"].to_numpy(), rtol=1e-5)


def test_export_safetensors_wrapped_and_pickle(tmp_path, trained):
    model, x, _ = trained
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:4]),), dynamic_shapes={"x": {0: batch}}),
                      tmp_path / "m.pt2")
    res = _scan(tmp_path, ckpt="m.pt2", model=None, out="s_pt2")
    assert res.exit_code == 0, res.output

    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "m.safetensors")
    assert _scan(tmp_path, ckpt="m.safetensors", out="s_st").exit_code == 0

    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, tmp_path / "l.ckpt")
    assert _scan(tmp_path, ckpt="l.ckpt", out="s_l").exit_code == 0
    base = read_manifest(tmp_path / "s_st")["loss"].to_numpy()
    for d in ("s_pt2", "s_l"):
        np.testing.assert_allclose(read_manifest(tmp_path / d)["loss"].to_numpy(), base, rtol=1e-5)

    torch.save(model, tmp_path / "full.pt")
    res = _scan(tmp_path, ckpt="full.pt", out="s_p")
    assert res.exit_code == 2 and "--unsafe-pickle" in res.output and "Traceback" not in res.output
    assert _scan(tmp_path, "--unsafe-pickle", ckpt="full.pt", out="s_p").exit_code == 0


def _bad(tmp_path, name, frame):
    pd.DataFrame(frame).to_parquet(tmp_path / name)
    return name


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing_file", "does not exist"),
        ("unknown_column", "--label-column 'target' is not a column"),
        ("label_out_of_range", "label 9 is out of range"),
        ("label_out_of_range_flag", "out of range for --num-classes 4"),
        ("nan_label", "label of sample 2 is nan"),
        ("float_label", "not an integer class id"),
        ("mse_for_a_classifier", "regression (mse) needs one output per target value"),
        ("nan_feature", "contain NaN/inf"),
        ("wrong_shape", "forward failed"),
        ("empty", "no samples"),
        ("not_differentiable", "not differentiable"),
        ("mismatch", "does not match the model"),
        ("bad_device", "no CUDA device" if not torch.cuda.is_available() else "is not a device"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, trained, case, pattern):
    _, x, y = trained
    feat = list(x[:6])
    extra: list[str] = ["--feature-column", "feat"]
    kw: dict = {}
    if case == "missing_file":
        kw["data"] = "nope.parquet"
    elif case == "unknown_column":
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": feat, "label": y[:6]})
        extra += ["--label-column", "target"]
    elif case in ("label_out_of_range", "label_out_of_range_flag"):
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": feat, "label": [0, 1, 9, 2, 3, 1]})
        if case.endswith("flag"):
            extra += ["--num-classes", "4"]
    elif case == "nan_label":
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": feat, "label": [0.0, 1.0, np.nan, 2.0, 3.0, 1.0]})
    elif case == "float_label":
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": feat, "label": [0.5, 1.0, 1.0, 2.0, 3.0, 1.0]})
    elif case == "mse_for_a_classifier":  # a 4-class model's 4 outputs against one number per sample
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": feat, "label": [0.5, 1.0, 1.0, 2.0, 3.0, 1.0]})
        extra += ["--loss", "mse"]
    elif case == "nan_feature":
        bad = [v.copy() for v in feat]
        bad[3][2] = np.nan
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": bad, "label": y[:6]})
    elif case == "wrong_shape":
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": [v[:5] for v in feat], "label": y[:6]})
    elif case == "empty":
        pd.DataFrame({"feat": pd.Series([], dtype=object), "label": pd.Series([], dtype="int64")}).to_parquet(tmp_path / "e.parquet")
        kw["data"] = "e.parquet"
    elif case == "not_differentiable":
        torch.save(__import__("models").ArgMaxNet().state_dict(), tmp_path / "am.pt")
        kw.update(ckpt="am.pt", model="models:ArgMaxNet", data=_bad(tmp_path, "d.parquet", {"feat": feat, "label": y[:6]}))
    elif case == "mismatch":
        kw.update(model="models:CNN", data=_bad(tmp_path, "d.parquet", {"feat": feat, "label": y[:6]}))
    elif case == "bad_device":
        kw["data"] = _bad(tmp_path, "d.parquet", {"feat": feat, "label": y[:6]})
        extra += ["--device", "cuda:0" if not torch.cuda.is_available() else "tpu9"]
    res = _scan(tmp_path, *extra, **kw)
    assert res.exit_code == 2, res.output
    assert pattern in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "scan" / "manifest.parquet").exists()


def test_rerun_with_other_options_is_refused_then_overwritten(tmp_path, trained):
    assert _scan(tmp_path).exit_code == 0
    res = _scan(tmp_path, "--seed", "3")
    assert res.exit_code == 2 and "different configuration" in " ".join(res.output.split())
    res = _scan(tmp_path, "--limit", "50")
    assert res.exit_code == 2 and "extra.limit: None -> 50" in " ".join(res.output.split()), res.output
    assert _scan(tmp_path, "--seed", "3", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["config"]["seed"] == 3
    # the same command again reuses the finished scan
    assert _scan(tmp_path, "--seed", "3").exit_code == 0


def test_cuda_graphs_is_a_speed_option_that_reaches_the_extractor_and_not_the_configuration(
    tmp_path, trained, monkeypatch
):
    import importlib

    driver = importlib.import_module("hardmine.scan.driver")  # `hardmine.scan` is also the function's name

    asked = []
    real = driver.GradientExtractor

    def recording(*args, **kwargs):
        asked.append(kwargs.get("cuda_graphs"))
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "GradientExtractor", recording)
    assert _scan(tmp_path, "--cuda-graphs").exit_code == 0
    assert asked == [True]  # on the CPU the extractor runs eagerly and says why, in scan.json too
    timings = json.loads((tmp_path / "scan" / "scan.json").read_text())["timings"]
    assert timings["cuda_graphs"] == {
        "requested": True, "captured": 0, "replayed": 0, "off": "the model is on cpu, not a CUDA device"
    }
    first = read_manifest(tmp_path / "scan")
    # without the flag, the same command finds the same configuration and reuses the scan
    res = _scan(tmp_path)
    assert res.exit_code == 0, res.output
    assert asked == [True, False]
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "scan"), first)


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "hardmine", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_mid_scan_then_resume_gives_the_same_manifest(tmp_path):
    torch.manual_seed(0)
    torch.save(MLP().state_dict(), tmp_path / "m.pt")
    common = ["--model", "models:MLP", "--dim", "8", "--batch-size", "100", "--shard-rows", "300", "--quiet"]
    ref = _cli("scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "ref", *common)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    proc = _cli("scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "run", *common)
    progress = tmp_path / "run" / "progress.json"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            try:
                done = len(json.loads(progress.read_text()).get("shards", []))
            except (json.JSONDecodeError, OSError):
                done = 0
            if done >= 5:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "scan finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "manifest.parquet").exists()  # no half manifest

    again = _cli("scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "run", *common)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    a, b = read_manifest(tmp_path / "ref"), read_manifest(tmp_path / "run")
    pd.testing.assert_frame_equal(a, b)


def test_version_and_help():
    import hardmine

    for args in (["--version"], ["version"]):
        res = invoke(*args)
        assert res.exit_code == 0 and res.stdout.strip() == hardmine.__version__
    res = invoke("scan", "--help")
    assert res.exit_code == 0 and "--feature-columns" in res.stdout


# ------------------------------------------------------------------------------------------ exit codes
# 0 success and 2 bad input are checked above for every command; 1 and 130 here.
def test_internal_error_exits_1_without_a_traceback_unless_debugging(tmp_path, trained, monkeypatch):
    assert _scan(tmp_path).exit_code == 0
    import hardmine.manifest

    def broken(*_a, **_k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(hardmine.manifest, "read_manifest", broken)
    monkeypatch.delenv("HARDMINE_DEBUG", raising=False)
    res = runner.invoke(app, ["show", str(tmp_path / "scan")])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "internal error: RuntimeError: simulated bug" in text and "HARDMINE_DEBUG=1" in text
    assert "Traceback" not in res.output
    monkeypatch.setenv("HARDMINE_DEBUG", "1")
    res = runner.invoke(app, ["show", str(tmp_path / "scan")])
    assert isinstance(res.exception, RuntimeError)  # the real exception, for a bug report


def test_ctrl_c_exits_130_and_the_same_command_resumes(tmp_path):
    torch.manual_seed(0)
    torch.save(MLP().state_dict(), tmp_path / "m.pt")
    cmd = ["scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "run", "--model", "models:MLP",
           "--dim", "8", "--batch-size", "100", "--shard-rows", "300", "--quiet"]
    proc = _cli(*cmd)
    progress = tmp_path / "run" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text()).get("shards", [])) >= 4:
                break
        except (json.JSONDecodeError, OSError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "scan finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in " ".join(err.split()) and "Traceback" not in err
    kept = len(json.loads(progress.read_text())["shards"])
    assert kept >= 4 and not (tmp_path / "run" / "manifest.parquet").exists()
    again = _cli(*cmd)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert len(read_manifest(tmp_path / "run")) == 3000


# ------------------------------------------------------------------------------------- one writer per directory
def test_one_writer_per_scan_directory_and_a_killed_writer_does_not_block(tmp_path):
    torch.manual_seed(0)
    torch.save(MLP().state_dict(), tmp_path / "m.pt")
    common = ["--model", "models:MLP", "--dim", "8", "--batch-size", "100", "--shard-rows", "300", "--quiet"]
    first = _cli("scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "run", *common)
    lock = tmp_path / "run" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    assert first.poll() is None, "scan finished before the test could race it"
    for extra in ([], ["--overwrite"]):  # --overwrite never deletes a directory a live scan holds
        second = _cli("scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "run", *common, *extra)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"being written by another scan (pid {first.pid}" in " ".join(err.split()), err
    os.kill(first.pid, signal.SIGKILL)  # the holder dies: the kernel drops its lock, the file stays
    first.wait()
    assert lock.exists()
    again = _cli("scan", tmp_path / "m.pt", "models:slow_tail", "--out", tmp_path / "run", *common)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert len(read_manifest(tmp_path / "run")) == 3000


def test_scan_leaves_the_index_to_the_first_query_unless_build_index(tmp_path, trained):
    res = _scan(tmp_path, "--json", out="lazy")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "lazy" / "index.faiss").exists()
    top = json.loads(invoke("show", tmp_path / "lazy", "--top", "1", "--json").stdout)[0]["sample_id"]
    res = invoke("neighbors", tmp_path / "lazy", "--ids", str(top), "-k", "3", "--json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "lazy" / "index.faiss").is_file()  # built by the first query, and kept
    res = _scan(tmp_path, "--json", "--build-index", out="eager")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eager" / "index.faiss").is_file()
    assert json.loads((tmp_path / "eager" / "scan.json").read_text())["index"]["kind"] == "flat"
