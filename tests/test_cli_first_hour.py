"""A new user's first hour on the command line: nothing clobbered, messages in CLI words and rendered
literally, tables in the manifest's names, reported weights as asked, every option documented."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_cli import _scan, invoke, runner, trained  # noqa: F401  (the trained fixture)
from typer.main import get_command

from hardmine.cli import app
from hardmine.manifest import read_manifest


def _text(res) -> str:
    return " ".join(res.output.split())


@pytest.fixture
def scanned(tmp_path, trained):  # noqa: F811
    assert _scan(tmp_path).exit_code == 0
    return tmp_path


def test_export_never_clobbers_a_file_it_did_not_create(scanned):
    csv = scanned / "data.csv"
    csv.write_text("a,b\n1,2\n")
    res = invoke("export", scanned / "scan", "--out", csv)
    assert res.exit_code == 2 and "is not a hardmine manifest" in _text(res) and "--overwrite" in _text(res)
    assert csv.read_text() == "a,b\n1,2\n"  # untouched
    res = invoke("export", scanned / "scan", "--out", scanned)  # a directory
    assert res.exit_code == 2 and "is a directory" in _text(res) and "Traceback" not in res.output
    out = scanned / "w.parquet"
    assert invoke("export", scanned / "scan", "--out", out).exit_code == 0
    assert invoke("export", scanned / "scan", "--out", out, "--strategy", "top-k").exit_code == 0  # its own file
    assert read_manifest(out).attrs["hardmine"]["export"]["strategy"] == "top-k"
    assert invoke("export", scanned / "scan", "--out", csv, "--overwrite").exit_code == 0  # asked for
    assert len(read_manifest(csv)) == 120


def test_messages_use_cli_words_and_keep_brackets(scanned):
    res = _scan(scanned, "--seed", "3")
    assert res.exit_code == 2
    assert "--overwrite" in _text(res) and "overwrite=True" not in _text(res) and "--out '" in _text(res)
    res = invoke("show", scanned / "scan", "--class", "9")
    assert res.exit_code == 2 and "labels are [0, 1, 2, 3]" in _text(res)  # not eaten as markup
    res = invoke("show", scanned / "nope")
    assert res.exit_code == 2 and "run `hardmine scan` first" in _text(res) or "does not exist" in _text(res)


def test_out_of_memory_is_exit_2_with_what_to_do(scanned, monkeypatch):
    import hardmine.manifest

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(hardmine.manifest, "read_manifest", oom)
    monkeypatch.delenv("HARDMINE_DEBUG", raising=False)
    res = runner.invoke(app, ["show", str(scanned / "scan")])
    assert res.exit_code == 2 and "out of memory" in _text(res) and "--batch-size" in _text(res)


def test_show_speaks_the_manifest_names_and_hardness_does_not_round_to_one(scanned):
    res = invoke("show", scanned / "scan", "--top", "8")
    assert res.exit_code == 0
    def cells(line: str) -> list[str]:
        return line.replace("┃", " ").replace("│", " ").split()

    header = cells(next(line for line in res.stdout.splitlines() if "sample_id" in line))
    m = read_manifest(scanned / "scan")
    for name in header:
        assert name == "flags" or name in m.columns, name
    top = m.nsmallest(8, "rank")
    ids = {str(i) for i in top["sample_id"]}
    shown = [cells(line) for line in res.stdout.splitlines() if ids & set(cells(line))]
    col = header.index("hardness")
    values = [float(row[col]) for row in shown]
    assert len(values) == 8 and len(set(values)) == len(set(np.round(top["hardness"], 6)))  # distinct stay distinct


def test_neighbor_scores_are_left_out_by_default_and_shown_when_asked(scanned):
    # Default: no neighbour pass; the two columns are NaN, the metadata says so and `show` leaves them out.
    m = read_manifest(scanned / "scan")
    assert m.attrs["hardmine"]["neighbor_scores"] is False and m.attrs["hardmine"]["k_used"] is None
    assert m["knn_outlier"].isna().all() and m["neighbor_disagreement"].isna().all()
    assert m["hardness"].notna().all()  # the default hardness does not need them
    shown = invoke("show", scanned / "scan", "--top", "3")
    assert shown.exit_code == 0 and "knn_outlier" not in shown.stdout and "neighbor_disagreement" not in shown.stdout
    # --neighbor-scores: computed, shown, and the same hardness (the default weights do not use them).
    assert _scan(scanned, "--neighbor-scores", out="scan_nb").exit_code == 0
    nb = read_manifest(scanned / "scan_nb")
    assert nb.attrs["hardmine"]["neighbor_scores"] is True and nb.attrs["hardmine"]["k_used"] == 10
    assert nb["knn_outlier"].notna().all() and nb["neighbor_disagreement"].between(0, 1).all()
    assert np.array_equal(nb["rank"].to_numpy(), m["rank"].to_numpy())
    shown = invoke("show", scanned / "scan_nb", "--top", "3")
    assert "knn_outlier" in shown.stdout and "neighbor_disagreement" in shown.stdout


def test_neighbors_agree_with_neighbor_disagreement_when_computed(scanned):
    assert _scan(scanned, "--neighbor-scores", out="scan_nb").exit_code == 0
    m = read_manifest(scanned / "scan_nb").set_index("sample_id")
    res = invoke("neighbors", scanned / "scan_nb", "--ids", "1000,1007", "-k", "10", "--json")
    assert res.exit_code == 0
    for entry in json.loads(res.stdout):
        differ = np.mean([r["label"] != entry["label"] for r in entry["neighbors"]])
        assert differ == pytest.approx(m.loc[entry["sample_id"], "neighbor_disagreement"])
    signed = json.loads(invoke("neighbors", scanned / "scan_nb", "--ids", "1000", "-k", "10", "--signed", "--json").stdout)
    assert all(r["similarity"] > -1 for r in signed[0]["neighbors"])


def test_export_reports_the_boost_that_was_asked(scanned):
    res = invoke("export", scanned / "scan", "--out", scanned / "o.parquet", "--strategy", "top-k", "--boost", "4",
                 "--top", "0.1", "--json")
    summary = json.loads(res.stdout)
    assert summary["hard_to_easy"] == pytest.approx(4.0) and not summary["capped"]
    res = invoke("export", scanned / "scan", "--out", scanned / "o.parquet", "--strategy", "top-k", "--boost", "50",
                 "--top", "0.1", "--cap", "3")
    assert res.exit_code == 0 and "capped at --cap 3x the mean" in _text(res)
    w = read_manifest(scanned / "o.parquet")["weight"]
    assert w.max() == pytest.approx(3.0) and w.mean() == pytest.approx(1.0)


def test_every_option_of_every_command_has_help():
    root = get_command(app)
    commands = root.commands
    assert {"scan", "show", "export", "neighbors"} <= set(commands)
    missing, seen = [], 0
    for name, cmd in commands.items():
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option":
                seen += 1
                if not (p.help or "").strip():
                    missing.append(f"{name} {p.opts[0]}")
    assert seen > 20 and not missing, f"options without help: {missing}"


def test_layers_lists_what_layers_can_select_with_counts_and_engine(tmp_path, monkeypatch):
    from models import TinyTransformer

    torch.manual_seed(0)
    net = TinyTransformer()
    torch.save(net.state_dict(), tmp_path / "tt.pt")
    res = invoke("layers", tmp_path / "tt.pt", "--model", "models:TinyTransformer", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["layer"]: r for r in json.loads(res.stdout)}
    own = {n: m for n, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert set(rows) == set(own)
    for name, m in own.items():
        assert rows[name]["n_params"] == sum(p.numel() for p in m.parameters(recurse=False))
    assert rows["classifier"]["engine"] == "factored" and rows["classifier"]["reason"] is None
    assert rows["encoder.self_attn"]["engine"] == "factored" and rows["encoder.self_attn"]["reason"] is None
    # the names are what --layers selects: a scan restricted to them plans the same engines
    from hardmine.engine import GradientExtractor

    plan = GradientExtractor(net, layers=["classifier", "encoder.self_attn"], dim=4).metadata()["plan"]
    assert plan["classifier.weight"] == "factored" and plan["encoder.self_attn.in_proj_weight"] == "factored"
    table = invoke("layers", tmp_path / "tt.pt", "--model", "models:TinyTransformer")
    total = sum(p.numel() for p in net.parameters())
    assert table.exit_code == 0 and "encoder.linear1" in table.stdout and f"{total:,} parameters" in table.stdout
    bad = invoke("layers", tmp_path / "nope.pt", "--model", "models:TinyTransformer")
    assert bad.exit_code == 2


def test_neighbors_from_another_scan_finds_the_training_samples_that_align(scanned):
    # A second "test" scan of the same model: a few training samples again, under new ids, plus fresh ones.
    d = np.load(scanned / "data.npz")
    x, y = d["X"], d["y"]
    np.savez(scanned / "test.npz", X=x[:10], y=y[:10], ids=np.arange(5000, 5010))
    assert _scan(scanned, data="test.npz", out="test_scan").exit_code == 0
    res = invoke("neighbors", scanned / "scan", "--from", scanned / "test_scan", "--ids", "5003", "-k", "3",
                 "--signed", "--json")
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    assert entry["sample_id"] == 5003 and entry["label"] == int(y[3])
    best = entry["neighbors"][0]
    assert best["sample_id"] == 1003 and best["similarity"] == pytest.approx(1.0, abs=1e-5)  # itself, in training
    # A scan in another projection space is refused, naming what differs.
    assert _scan(scanned, "--seed", "9", data="test.npz", out="other_seed").exit_code == 0
    res = invoke("neighbors", scanned / "scan", "--from", scanned / "other_seed", "--ids", "5003")
    assert res.exit_code == 2 and "not comparable (seed: 0 vs 9" in " ".join(res.output.split())
    res = invoke("neighbors", scanned / "scan", "--from", scanned / "test_scan", "--ids", "1003")
    assert res.exit_code == 2 and "sample_id 1003 is not in the scan" in " ".join(res.output.split())


def test_a_failed_scan_never_blocks_its_own_fix(tmp_path, trained):  # noqa: F811
    _, x, y = trained
    bad = y.copy()
    bad[2] = 9  # first batch: fails before any shard
    np.savez(tmp_path / "bad_early.npz", X=x, y=bad)
    res = _scan(tmp_path, data="bad_early.npz", out="s1")
    assert res.exit_code == 2 and "label 9" in _text(res)
    assert not (tmp_path / "s1").exists()  # nothing left: the corrected command is not refused
    np.savez(tmp_path / "good.npz", X=x, y=y)
    assert _scan(tmp_path, "--input-shape", "12", data="good.npz", out="s1").exit_code == 0  # other options too

    late = y.copy()
    late[100] = 9  # batch 4 of 32: three shards of 32 rows are complete by then
    np.savez(tmp_path / "bad_late.npz", X=x, y=late)
    res = _scan(tmp_path, "--shard-rows", "32", data="bad_late.npz", out="s2")
    assert res.exit_code == 2 and "label 9" in _text(res)
    assert "3 complete shard(s) of this scan are kept" in _text(res) and "--overwrite" in _text(res)
    np.savez(tmp_path / "bad_late.npz", X=x, y=y)  # the user fixes the label and reruns the same command
    res = _scan(tmp_path, "--shard-rows", "32", data="bad_late.npz", out="s2")
    assert res.exit_code == 0, res.output
    assert len(read_manifest(tmp_path / "s2")) == 120
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    res = _scan(tmp_path, data="bad_early.npz", out="mine")  # a directory the user owns is never removed
    assert res.exit_code == 2 and (tmp_path / "mine" / "keep.txt").read_text() == "x"


def test_dim_is_bounded_before_anything_is_allocated_or_written(tmp_path, trained, monkeypatch):  # noqa: F811
    res = _scan(tmp_path, "--dim", "100000")  # 276 parameters -> 200k-dim vectors: refused
    assert res.exit_code == 2 and "selected parameters" in _text(res) and "--dim" in _text(res)
    assert not (tmp_path / "scan").exists()
    res = _scan(tmp_path, "--dim", "1000000000")
    assert res.exit_code == 2 and "Traceback" not in res.output and not (tmp_path / "scan").exists()
    import importlib

    driver = importlib.import_module("hardmine.scan.driver")  # `hardmine.scan` is the function
    monkeypatch.setattr(driver, "_available_memory", lambda: 2**20)  # 1 MiB free: one shard cannot fit
    res = _scan(tmp_path, "--dim", "8")
    assert res.exit_code == 2 and "--shard-rows" in _text(res) and "memory available" in _text(res)
    monkeypatch.setattr(driver, "_available_memory", lambda: None)
    assert _scan(tmp_path, "--dim", "8").exit_code == 0


def test_text_labels_are_mapped_to_ids_recorded_and_shown_by_name(tmp_path, trained):  # noqa: F811
    _, x, y = trained
    animals = np.array(["cat", "dog", "emu", "yak"])[y]
    pd.DataFrame({"feat": list(x), "label": animals}).to_parquet(tmp_path / "d.parquet", row_group_size=37)
    res = _scan(tmp_path, "--feature-column", "feat", data="d.parquet")
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "scan")
    assert m.attrs["hardmine"]["class_names"] == ["cat", "dog", "emu", "yak"]  # sorted names: class i
    assert m.sort_values("sample_id")["label"].tolist() == y.tolist()  # the same ids as the numeric labels
    rows = json.loads(invoke("show", tmp_path / "scan", "--top", "5", "--class", "emu", "--json").stdout)
    assert rows and all(r["label"] == 2 and r["label_name"] == "emu" for r in rows)
    table = invoke("show", tmp_path / "scan", "--top", "5").stdout
    assert any(name in table for name in ("cat", "dog", "emu", "yak"))
    frame = pd.DataFrame(x, columns=[f"p{i}" for i in range(12)]).assign(label=animals)
    frame.to_csv(tmp_path / "d.csv", index=False)
    # --class-names numbers the names: class i is its i-th name, whatever order sorting would give
    res = _scan(tmp_path, "--feature-columns", "p*", "--class-names", "yak,emu,dog,cat", data="d.csv", out="csv")
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "csv")
    assert m.attrs["hardmine"]["class_names"] == ["yak", "emu", "dog", "cat"]
    assert m.sort_values("sample_id")["label"].tolist() == (3 - y).tolist()
    # A subset without one class (here no "cat"): numbered by sorted names its ids would shift, so it is refused
    # and names the way out; with the model's names it keeps every id
    keep = animals != "cat"
    frame[keep].to_csv(tmp_path / "sub.csv", index=False)
    res = _scan(tmp_path, "--feature-columns", "p*", data="sub.csv", out="sub")
    assert res.exit_code == 2 and "--class-names" in _text(res) and "4 classes" in _text(res), res.output
    assert not (tmp_path / "sub").exists()
    res = _scan(tmp_path, "--feature-columns", "p*", "--num-classes", "4", data="sub.csv", out="sub")
    assert res.exit_code == 2 and "--class-names" in _text(res)
    res = _scan(tmp_path, "--feature-columns", "p*", "--class-names", "cat,dog,emu,yak", data="sub.csv", out="sub")
    assert res.exit_code == 0, res.output
    sub = read_manifest(tmp_path / "sub").sort_values("sample_id")
    assert sub["label"].tolist() == y[keep].tolist()
    res = _scan(tmp_path, "--feature-columns", "p*", "--class-names", "cat,dog,emu", data="d.csv", out="few")
    assert res.exit_code == 2 and "'yak'" in _text(res) and "not among the model's class names" in _text(res)
    res = invoke("show", tmp_path / "scan", "--class", "wolf")
    assert res.exit_code == 2 and "neither a class id nor a class name" in _text(res)
    # Integer labels name no classes: --class-names must still name every class of the model, or the names
    # past a missing one would label other classes' samples
    pd.DataFrame({"feat": list(x), "label": y}).to_parquet(tmp_path / "ints.parquet")
    for names in ("a,b,c", "a,b,c,d,e"):
        res = _scan(tmp_path, "--feature-column", "feat", "--class-names", names, data="ints.parquet", out="ints")
        assert res.exit_code == 2 and "the model has 4 classes but --class-names names" in _text(res), res.output
        assert not (tmp_path / "ints").exists()
    res = _scan(tmp_path, "--feature-column", "feat", "--class-names", "a,b,c", "--num-classes", "4",
                data="ints.parquet", out="ints")
    assert res.exit_code == 2 and "--class-names names 3 classes" in _text(res) and "--num-classes is 4" in _text(res)
    res = _scan(tmp_path, "--feature-column", "feat", "--class-names", "a,b,c,d", data="ints.parquet", out="ints")
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "ints").attrs["hardmine"]["class_names"] == ["a", "b", "c", "d"]


def test_layers_shows_a_tied_head_as_factored_and_counts_it_once():
    from test_factored import Tied

    from hardmine.cli.cmd_layers import layer_rows

    model = Tied()
    rows = {r["layer"]: r for r in layer_rows(model)}
    assert rows["e"]["engine"] == rows["h"]["engine"] == "factored"
    assert rows["h"]["n_params"] == 0 and "tied to e.weight" in rows["h"]["reason"]
    assert sum(r["n_params"] for r in rows.values()) == sum(p.numel() for p in model.parameters())


def test_with_data_puts_the_data_in_view(tmp_path, trained):  # noqa: F811
    _, x, y = trained
    texts = [f"review number {i} says {'good' if v % 2 else 'bad'}" for i, v in enumerate(y)]
    pd.DataFrame({"feat": list(x), "label": y, "uid": [f"r{i}" for i in range(len(y))], "text": texts}).to_parquet(
        tmp_path / "d.parquet")
    assert _scan(tmp_path, "--feature-column", "feat", "--id-column", "uid", data="d.parquet").exit_code == 0
    rows = json.loads(invoke("show", tmp_path / "scan", "--top", "3", "--with-data", "--json").stdout)
    # Feature data: the file and row each sample came from (custom ids are looked up in the file).
    assert all(r["data"] == f"d.parquet[{int(r['sample_id'][1:])}]" for r in rows)
    from hardmine.loaders.view import data_snippets

    src = {"data": str(tmp_path / "d.parquet"), "data_format": "parquet", "text_column": "text", "id_column": "uid"}
    assert data_snippets(src, ["r3", "r7"], width=12) == {"r3": texts[3][:11] + "…", "r7": texts[7][:11] + "…"}
    table = invoke("show", tmp_path / "scan", "--top", "3", "--with-data").stdout
    assert "d.parquet[" in table
    res = invoke("slices", tmp_path / "scan", "--top", "2", "--with-data", "--json")
    assert res.exit_code == 0 and all("representative_data" in r for r in json.loads(res.stdout))


def test_the_review_queue_carries_the_data(tmp_path, trained):  # noqa: F811
    _, x, y = trained
    np.savez(tmp_path / "data.npz", X=x, y=y)
    assert _scan(tmp_path, "--dim", "8").exit_code == 0
    res = invoke("review", tmp_path / "scan", "--out", tmp_path / "q.csv", "--budget", "5")
    assert res.exit_code == 0, res.output
    q = pd.read_csv(tmp_path / "q.csv")
    assert (q["data"] == [f"data.npz[{i}]" for i in q["sample_id"]]).all()


def test_json_output_is_standard_json_with_ids_as_numbers(tmp_path, trained):  # noqa: F811
    # NaN scores (neighbour scores are off by default) come out as null, which every JSON parser reads, and
    # integer sample ids as numbers in every command (NumPy values are written as the numbers they hold)
    _, x, y = trained
    np.savez(tmp_path / "data.npz", X=x, y=y)
    assert _scan(tmp_path, "--dim", "8").exit_code == 0

    def strict(text: str):
        def refuse(name: str):
            raise AssertionError(f"{name} is not JSON")

        return json.loads(text, parse_constant=refuse)

    shown = strict(invoke("show", tmp_path / "scan", "--top", "3", "--json").stdout)
    assert shown and "knn_outlier" in shown[0] and shown[0]["knn_outlier"] is None
    assert all(isinstance(r["sample_id"], int) for r in shown)
    sliced = strict(invoke("slices", tmp_path / "scan", "--top", "2", "--json").stdout)
    assert sliced and all(isinstance(i, int) for r in sliced for i in r["representative_ids"])
