"""Token-level hardness (``hardmine.tokens``, ``Scan.tokens``, ``hardmine tokens``): one sample read from its own
row groups only, tier thresholds that are the planted quantiles (exactly, or within the documented accuracy of
the streamed sample), and the terminal / JSON / HTML views with the right tier on the right token.

The fixtures are real (tiny) classification scans with a ``tokens.parquet`` written beside them in the schema a
causal-LM scan writes, so the reading side is tested apart from the LM scan itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from models import MLP
from typer.testing import CliRunner

import hardmine.tokens as tk
from hardmine.cli import app
from hardmine.enums import TokenTier
from hardmine.scan import Scan, scan

runner = CliRunner()
N = 12  # samples per fixture scan
GROUP = 4  # samples per row group (one row group per "extraction shard")
SCRIPT = "<script>alert(1)</script>"
# Custom ids out of lexicographic order, so the row groups' min/max statistics overlap and cannot skip a group.
NAMES = ["q", "c", "x", "a", "m", "b", "z", "d", "k", "e", "y", "f"]


def _schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([("sample_id", id_type), ("position", pa.int32()), ("token_id", pa.int64()),
                      ("token", pa.string()), ("is_target", pa.bool_()), ("loss", pa.float32()),
                      ("entropy", pa.float32()), ("top1", pa.bool_())])


def _token_rows(ids: list) -> pd.DataFrame:
    """Per sample 6-8 tokens: positions 0-1 are the prompt (not targets), the rest targets with losses drawn in
    [0.1, 5]; position 0 has no loss. Sample 5 carries the planted tokens: a target with loss 50 (red), one with
    loss 0 (no tier), a non-target with loss 99 (never a tier) and the HTML-injection token."""
    g = np.random.default_rng(3)
    rows = []
    for i, sid in enumerate(ids):
        n = 6 + i % 3
        for p in range(n):
            loss = None if p == 0 else float(np.float32(g.uniform(0.1, 5.0)))
            rows.append({"sample_id": sid, "position": p, "token_id": 1000 * i + p, "token": f" w{i}_{p}",
                         "is_target": p >= 2, "loss": loss, "entropy": None if p == 0 else 1.0 + p / 10,
                         "top1": None if p == 0 else p % 2 == 0})
    df = pd.DataFrame(rows)
    five = df.index[df["sample_id"] == ids[5]]
    df.loc[five[1], ["token", "loss"]] = ["\nprompt", 99.0]  # a non-target
    df.loc[five[2], ["token", "loss"]] = [" hard", 50.0]
    df.loc[five[3], ["token", "loss"]] = [" easy", 0.0]
    df.loc[five[4], "token"] = SCRIPT
    return df


def write_tokens(scan_dir: Path, df: pd.DataFrame, ids: list, id_type: pa.DataType) -> Path:
    """``tokens.parquet`` with one row group per ``GROUP`` samples (a causal-LM scan's one per shard)."""
    path = scan_dir / tk.TOKENS_FILE
    schema = _schema(id_type)
    with pq.ParquetWriter(path, schema) as w:
        for lo in range(0, len(ids), GROUP):
            part = df[df["sample_id"].isin(ids[lo : lo + GROUP])]
            w.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))
    return path


def _tiny_scan(out: Path, ids: list | None):
    model = MLP(d_in=4, hidden=6, n_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    batches = [(x[i : i + 6], y[i : i + 6]) if ids is None else (x[i : i + 6], y[i : i + 6], ids[i : i + 6])
               for i in range(0, N, 6)]
    return scan(model, batches, out=out, dim=4, engine="vmap")


@pytest.fixture(scope="module")
def lm_scans(tmp_path_factory):
    """Two scans with tokens files: integer ids (0..11) and string ids (``NAMES``), plus a plain one without."""
    root = tmp_path_factory.mktemp("tokens")
    int_scan = _tiny_scan(root / "int", None)
    ids = list(range(N))
    int_rows = _token_rows(ids)
    write_tokens(int_scan.path, int_rows, ids, pa.int64())
    str_scan = _tiny_scan(root / "str", NAMES)
    str_rows = _token_rows(NAMES)
    write_tokens(str_scan.path, str_rows, NAMES, pa.string())
    plain = _tiny_scan(root / "plain", None)
    return {"int": (int_scan, int_rows), "str": (str_scan, str_rows), "plain": plain}


class _Reads:
    """Records every ``ParquetFile.iter_batches`` call: (row groups, columns)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
        real = pq.ParquetFile.iter_batches

        def spy(pf, *args, **kwargs):
            self.calls.append((tuple(kwargs.get("row_groups") or ()), tuple(kwargs.get("columns") or ())))
            return real(pf, *args, **kwargs)

        monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)

    def groups(self, full: bool) -> set[int]:
        return {g for gs, cols in self.calls if (len(cols) == len(tk.TOKEN_COLUMNS)) == full for g in gs}


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("kind", ["int", "str"])
def test_scan_tokens_returns_exactly_the_samples_rows_in_position_order(lm_scans, kind):
    sc, rows = lm_scans[kind]
    for i in (0, 5, N - 1):
        sid = rows["sample_id"].unique()[i]
        df = sc.tokens(sid)
        want = rows[rows["sample_id"] == sid].reset_index(drop=True)
        assert list(df.columns) == list(tk.TOKEN_COLUMNS)
        assert df["sample_id"].tolist() == [sid] * len(want)
        assert df["position"].tolist() == list(range(len(want)))
        assert df["token"].tolist() == want["token"].tolist()
        assert df["is_target"].dtype == bool and df["is_target"].tolist() == want["is_target"].tolist()
        assert df["loss"].dtype == np.float32 and math.isnan(df["loss"].iloc[0])
        np.testing.assert_allclose(df["loss"].iloc[1:], want["loss"].iloc[1:].astype(np.float32))
        assert df["top1"].dtype == "boolean" and pd.isna(df["top1"].iloc[0])
        assert df["top1"].iloc[1:].tolist() == want["top1"].iloc[1:].tolist()


def test_one_sample_reads_only_its_own_row_group(lm_scans, monkeypatch):
    sc, _ = lm_scans["int"]
    reads = _Reads(monkeypatch)
    assert len(sc.tokens(5)) == 6 + 5 % 3
    # Integer ids in scan order: the statistics skip the other groups unread; sample 5 is in group 1.
    assert reads.groups(full=True) == {1} and reads.groups(full=False) == {1}
    reads.calls.clear()
    sc2, _ = lm_scans["str"]
    sc2.tokens("b")  # NAMES[5]: group 1
    # Overlapping string statistics: the id column of a group may be read, but only group 1 in full, and the
    # groups after the sample's own are not touched (its rows are contiguous).
    assert reads.groups(full=True) == {1} and reads.groups(full=False) == {0, 1}


def test_no_tokens_file_and_unknown_ids_are_clear_errors(lm_scans):
    with pytest.raises(ValueError, match="causal-LM scans.*'classification'"):
        lm_scans["plain"].tokens(0)
    sc, _ = lm_scans["int"]
    with pytest.raises(ValueError, match="sample_id 999 is not in"):
        sc.tokens(999)
    with pytest.raises(ValueError, match="'5' is not an integer"):
        sc.tokens("5")
    with pytest.raises(ValueError, match="sample_id 'nope' is not in"):
        lm_scans["str"][0].tokens("nope")
    with pytest.raises(ValueError, match="5 is not a string"):
        lm_scans["str"][0].tokens(5)


# ------------------------------------------------------------------------------------------------ tiers
def _planted_file(tmp: Path, n_target: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A bare tokens file: ``n_target`` target losses spread evenly over [0, 1) in random order (the q-quantile
    is q), interleaved with as many non-targets of loss 50 and position-0 rows without loss, which must not
    count. Several row groups."""
    g = np.random.default_rng(seed)
    target = g.permutation((np.arange(n_target) + 0.5) / n_target).astype(np.float32)
    n = 2 * n_target
    loss = np.full(n, 50.0, dtype=np.float32)
    is_target = np.zeros(n, dtype=bool)
    is_target[1::2] = True
    loss[1::2] = target
    valid = np.ones(n, dtype=bool)
    valid[::10] = False  # "position 0" rows (non-targets here): null loss
    table = pa.table({
        "sample_id": pa.array(np.arange(n) // 10, pa.int64()), "position": pa.array(np.arange(n) % 10, pa.int32()),
        "token_id": pa.array(np.arange(n), pa.int64()), "token": pa.array(["x"] * n, pa.string()),
        "is_target": pa.array(is_target), "loss": pa.array(loss, mask=~valid),
        "entropy": pa.array(np.ones(n, np.float32), mask=~valid), "top1": pa.array(np.ones(n, bool), mask=~valid),
    })
    tmp.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp / tk.TOKENS_FILE, row_group_size=max(n // 7, 1))
    return tmp, target


def test_thresholds_are_the_exact_quantiles_of_target_loss_when_they_fit(tmp_path):
    d, target = _planted_file(tmp_path / "a", 5000)
    th = tk.tier_thresholds(d, sample_size=5000)
    assert th.exact and th.n_target == 5000 and th.n_sampled == 5000
    want = np.quantile(target.astype(np.float64), [0.5, 0.8, 0.95])
    assert (th.yellow, th.orange, th.red) == tuple(want.tolist())
    assert th.to_dict()["quantiles"] == {"yellow": 0.5, "orange": 0.8, "red": 0.95}


def test_sampled_thresholds_are_within_the_documented_accuracy_and_repeatable(tmp_path):
    n, m = 60_000, 4096
    d, _ = _planted_file(tmp_path / "b", n)
    th = tk.tier_thresholds(d, sample_size=m)
    assert not th.exact and th.n_target == n and th.n_sampled == m
    for tier, q in tk.TIER_QUANTILES.items():
        # The planted q-quantile is q; the documented error is sqrt(q(1-q)/m) per standard deviation (4 here).
        assert abs(th.threshold(tier) - q) <= 4 * math.sqrt(q * (1 - q) / m) + 1 / n, (tier, th)
    assert tk.tier_thresholds(d, sample_size=m) == th  # seeded: the same file gives the same thresholds


def test_thresholds_stored_by_the_writer_are_read_from_the_footer_without_a_pass(tmp_path, monkeypatch):
    d, _ = _planted_file(tmp_path / "c", 3000)
    pf = pq.ParquetFile(d / tk.TOKENS_FILE)
    acc = tk.TierAccumulator(1000)  # what a scan's writer does, shard by shard
    for g in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(g, columns=["is_target", "loss"])
        acc.update(t.column(0), t.column(1))
    stored = acc.thresholds()
    assert stored == tk.tier_thresholds(d, sample_size=1000)  # same tokens, same order: the same sample
    table = pf.read()
    with pq.ParquetWriter(tmp_path / "s.parquet", table.schema) as w:
        w.write_table(table)
        w.add_key_value_metadata({tk.TIERS_METADATA_KEY: json.dumps(stored.to_dict())})
    (tmp_path / "s").mkdir()
    (tmp_path / "s.parquet").rename(tmp_path / "s" / tk.TOKENS_FILE)
    reads = _Reads(monkeypatch)
    assert tk.tier_thresholds(tmp_path / "s") == stored and reads.calls == []  # the footer only
    exact = tk.tier_thresholds(tmp_path / "s", sample_size=5000)  # asking for a size recomputes
    assert exact.exact and exact.n_target == 3000 and reads.calls


def test_tiers_follow_the_thresholds_and_skip_non_targets(lm_scans):
    sc, rows = lm_scans["int"]
    th = sc.token_tiers()
    targets = rows.loc[rows["is_target"], "loss"].astype(float).to_numpy()
    assert th.exact and th.n_target == len(targets)  # non-targets (loss 99) and null losses are not counted
    np.testing.assert_allclose([th.yellow, th.orange, th.red], np.quantile(targets, [0.5, 0.8, 0.95]))
    df = sc.tokens(5)
    tiers = tk.assign_tiers(df, th)
    by_token = dict(zip(df["token"], tiers))
    assert by_token[" hard"] == "red" and by_token[" easy"] == "none" and by_token["\nprompt"] == "none"
    for loss, target, tier in zip(df["loss"], df["is_target"], tiers):
        want = "none"
        for t in (TokenTier.YELLOW, TokenTier.ORANGE, TokenTier.RED):
            if target and loss >= th.threshold(t):
                want = t.value
        assert tier == want


def test_summary_of_a_sample():
    df = pd.DataFrame({"position": [0, 1, 2, 3], "token": ["a", "b", "c", "d"], "is_target": [False, True, True, True],
                       "loss": np.array([np.nan, 1.0, 2.0, 3.0], np.float32),
                       "entropy": np.array([np.nan, 0.5, 0.5, 1.1], np.float32),
                       "top1": pd.array([None, True, False, False], dtype="boolean")})
    th = tk.TierThresholds(1.5, 2.5, 2.9, 10, 10)
    s = tk.token_summary(df, th)
    assert s["n_tokens"] == 4 and s["n_target_tokens"] == 3
    assert s["mean_loss"] == pytest.approx(2.0) and s["perplexity"] == pytest.approx(math.exp(2.0))
    assert s["max_token_loss"] == 3.0 and s["top1_miss_rate"] == pytest.approx(2 / 3)
    assert s["token_entropy_mean"] == pytest.approx(0.7, abs=1e-6)
    assert s["tiers"] == {"none": 1, "yellow": 1, "orange": 0, "red": 1}


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_text_highlights_the_tiers(lm_scans, monkeypatch):
    sc, rows = lm_scans["int"]
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLORTERM", "truecolor")
    monkeypatch.delenv("NO_COLOR", raising=False)
    res = runner.invoke(app, ["tokens", str(sc.path), "--id", "5"])
    assert res.exit_code == 0, res.output
    red_bg = "48;2;255;135;135"  # the red tier's background (#ff8787)
    assert f"{red_bg}m hard" in res.output
    assert f"{red_bg}m easy" not in res.output and f"{red_bg}m\nprompt" not in res.output
    assert "\x1b[2mprompt" in res.output  # a non-target: dim (rich restarts the style after the newline)
    assert "\x1b[0m easy\x1b" in res.output  # a target below yellow: plain
    th = sc.token_tiers()
    assert f"loss >= {th.red:.3f} (q0.95)" in res.output and "mean loss" in res.output


def test_cli_json_rows_tiers_and_thresholds(lm_scans):
    sc, rows = lm_scans["str"]
    res = runner.invoke(app, ["tokens", str(sc.path), "--id", "b", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    want = rows[rows["sample_id"] == "b"]
    assert out["sample_id"] == "b" and [t["token"] for t in out["tokens"]] == want["token"].tolist()
    tier = {t["token"]: t["tier"] for t in out["tokens"]}
    assert tier[" hard"] == "red" and tier[" easy"] == "none" and tier["\nprompt"] == "none"
    assert out["tokens"][0]["loss"] is None and out["tokens"][0]["top1"] is None
    th = sc.token_tiers()
    assert out["thresholds"]["red"] == th.red and out["thresholds"]["n_target_tokens"] == th.n_target
    assert out["summary"]["n_tokens"] == len(want) and out["summary"]["tiers"]["red"] >= 1


def test_cli_html_is_escaped_classed_and_never_clobbers(lm_scans, tmp_path):
    sc, _ = lm_scans["int"]
    page = tmp_path / "t.html"
    res = runner.invoke(app, ["tokens", str(sc.path), "--id", "5", "--html", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert f'<meta name="generator" content="{tk.GENERATOR}' in text and "<style>" in text
    assert 'class="tok t-red" title="position 2 ' in text and ">&lt;script&gt;" in text
    assert "<script>" not in text and "src=" not in text and "href=" not in text  # nothing runs, nothing fetched
    assert '<span class="tok nt" title="position 1 · id 5001 · loss 99.000' in text
    assert '<span class="tok t-none" title="position 3 ' in text  # loss 0: a target with no tier
    mine = tmp_path / "notes.html"
    mine.write_text("mine")
    res = runner.invoke(app, ["tokens", str(sc.path), "--id", "5", "--html", str(mine)])
    assert res.exit_code == 2 and "--overwrite" in res.output and mine.read_text() == "mine"
    assert runner.invoke(app, ["tokens", str(sc.path), "--id", "5", "--html", str(mine), "--overwrite"]).exit_code == 0
    assert "t-red" in mine.read_text()
    res = runner.invoke(app, ["tokens", str(sc.path), "--id", "6", "--html", str(page), "--json"])  # its own page
    assert res.exit_code == 0 and json.loads(res.stdout)["html"] == str(page) and "sample 6" in page.read_text()


@pytest.mark.parametrize("args, message", [
    (["--id", "abc"], "'abc' is not an integer"),
    (["--id", "999"], "sample_id 999 is not in"),
    (["--id", ""], "is empty"),
])
def test_cli_bad_ids_exit_2(lm_scans, args, message):
    sc, _ = lm_scans["int"]
    res = runner.invoke(app, ["tokens", str(sc.path), *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_cli_not_a_causal_lm_scan_or_not_a_scan_exit_2(lm_scans, tmp_path):
    res = runner.invoke(app, ["tokens", str(lm_scans["plain"].path), "--id", "0"])
    assert res.exit_code == 2 and "causal-LM" in res.output and "tokens.parquet" in res.output
    res = runner.invoke(app, ["tokens", str(tmp_path), "--id", "0"])
    assert res.exit_code == 2 and "not a hardmine scan directory" in res.output
    res = runner.invoke(app, ["tokens", str(lm_scans["plain"].path), "--id", "0", "--html", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.output


def test_scan_tokens_accepts_numpy_ids_and_scan_open(lm_scans):
    sc, _ = lm_scans["int"]
    again = Scan.open(sc.path)
    assert again.tokens(np.int64(3)).equals(sc.tokens(3))
