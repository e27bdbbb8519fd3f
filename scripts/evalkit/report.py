"""Markdown tables of the quality benchmark, rendered from the JSON result (so the two never disagree)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["render_markdown", "fmt"]


def fmt(ms: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` of a summary cell; 'n/a' when missing."""
    if not ms or ms.get("mean") is None or (isinstance(ms["mean"], float) and math.isnan(ms["mean"])):
        return "n/a"
    m, s = ms["mean"] * scale, (ms.get("std") or 0.0) * scale
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_ci(ms: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± 95% half-width`` of a paired difference (``ci95``), falling back to ``fmt``."""
    if not ms or ms.get("ci95") is None or (isinstance(ms["ci95"], float) and math.isnan(ms["ci95"])):
        return fmt(ms, scale, digits)
    return f"{ms['mean'] * scale:+.{digits}f} ± {ms['ci95'] * scale:.{digits}f}"


def _slice_f1_table(tasks: dict[str, Any]) -> list[str]:
    names = [t for t in ("hidden-strat", "hidden-strat+noise5") if "slice_f1" in tasks.get(t, {}).get("summary", {})]
    if not names:
        return []
    embs = list(tasks[names[0]]["summary"]["slice_f1"])
    lines = [
        "### Slices: best-matching-slice F1 for the hidden minority, by embedding",
        "",
        "Per-class spherical k-means with the library's K rule (`hardmine.slices`); for each hidden minority "
        "sub-class, the F1 of the slice of its class that matches it best, averaged over the minority "
        "sub-classes. `gradients`: the scan's unit projected gradients of all layers (the manifest's `slice` "
        "column); `output-layer`: only the output layer's gradient columns; `features`: the first model's "
        "penultimate activations (the output layer's input; GEORGE's embedding).",
        "",
        "| embedding | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for e in embs:
        lines.append(f"| {e} | " + " | ".join(fmt(tasks[t]["summary"]["slice_f1"].get(e)) for t in names) + " |")
    lines.append("")
    return lines


def _best(rows: dict[str, Any], metric: str) -> str | None:
    best, val = None, -math.inf
    for name, r in rows.items():
        v = (r.get(metric) or {}).get("mean") if isinstance(r, dict) else None
        if v is not None and not math.isnan(v) and v > val:
            best, val = name, v
    return best


def _bold_if(name: str, text: str, best: str | None) -> str:
    return f"**{text}**" if name == best else text


def _detection_table(tasks: dict[str, Any]) -> list[str]:
    names = [t for t in ("noise-symmetric", "noise-pairs") if t in tasks]
    if not names:
        return []
    lines = [
        "### Label-noise detection (AUROC; precision at the true noise rate)",
        "",
        "| score | " + " | ".join(f"{t} AUROC | {t} P@rate" for t in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    rows = list(tasks[names[0]]["summary"]["scores"])
    bests = {t: _best(tasks[t]["summary"]["scores"], "auroc") for t in names}
    for r in rows:
        cells = []
        for t in names:
            sc = tasks[t]["summary"]["scores"].get(r, {})
            cells += [_bold_if(r, fmt(sc.get("auroc")), bests[t]), fmt(sc.get("p_at_rate"))]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    cl = [tasks[t]["summary"].get("cleanlab_find_label_issues") for t in names]
    if all(cl):
        lines.append("")
        lines.append(
            "cleanlab `find_label_issues` (its own cut-off): "
            + "; ".join(
                f"{t}: flags {fmt(c['n_flagged'], digits=0)}, precision {fmt(c['precision'])}, "
                f"recall {fmt(c['recall'])}"
                for t, c in zip(names, cl, strict=True)
            )
            + "."
        )
    rates = ", ".join(f"{t} {fmt(tasks[t]['summary']['noise_rate'])}" for t in names)
    accs = ", ".join(f"{t} {fmt(tasks[t]['summary']['first_model_test_acc'])}" for t in names)
    lines += ["", f"Noise rates: {rates}. Test accuracy of the model that was scanned: {accs}.", ""]
    return lines


def _minority_table(tasks: dict[str, Any]) -> list[str]:
    names = [
        t
        for t in ("hidden-strat", "hidden-strat+noise5")
        if t in tasks and "minority_scores" in tasks[t]["summary"]
    ]
    if not names:
        return []
    lines = [
        "### Hidden stratification: minority-membership AUROC of each score",
        "",
        "| score | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    bests = {t: _best(tasks[t]["summary"]["minority_scores"], "auroc") for t in names}
    for r in tasks[names[0]]["summary"]["minority_scores"]:
        cells = [
            _bold_if(r, fmt(tasks[t]["summary"]["minority_scores"].get(r, {}).get("auroc")), bests[t])
            for t in names
        ]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _policy_table(
    tasks: dict[str, Any], names: list[str], metrics: list[tuple[str, str]], title: str
) -> list[str]:
    names = [t for t in names if t in tasks]
    if not names:
        return []
    head = " | ".join(f"{t} {label}" for t in names for _, label in metrics)
    lines = [title, "", f"| policy | {head} |", "|---|" + "---|" * (len(names) * len(metrics))]
    bests = {(t, m): _best(tasks[t]["summary"]["policies"], m) for t in names for m, _ in metrics}
    for p in tasks[names[0]]["summary"]["policies"]:
        cells = []
        for t in names:
            row = tasks[t]["summary"]["policies"].get(p, {})
            for m, _ in metrics:
                if "status" in row:
                    cells.append(row["status"])
                else:
                    cells.append(_bold_if(p, fmt(row.get(m), scale=100.0, digits=1), bests[(t, m)]))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _study_table(study: dict[str, Any] | None) -> list[str]:
    if not study or not study.get("rows"):
        return []
    cols = study["columns"]
    lines = [
        f"### {study['title']}",
        "",
        study.get("note", ""),
        "",
        "| " + study.get("row_label", "row") + " | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, row in study["rows"].items():
        scale = study.get("scale", 1.0)
        digits = 1 if scale != 1.0 else 3
        lines.append(
            f"| {name} | " + " | ".join(fmt(row.get(c), scale=scale, digits=digits) for c in cols) + " |"
        )
    lines.append("")
    return lines


def _intro(meta: dict[str, Any], seeds: int, rseeds: int) -> list[str]:
    tr, z = meta["train"], meta["sizes"]
    minor = round(z["hs_major"] * z["hs_minority"] / (1 - z["hs_minority"]))
    fmnist = meta.get("dataset", "fashion-mnist") == "fashion-mnist"
    model = "784" if fmnist else "d"
    online = (
        ""
        if meta.get("online_rows", True)
        else " The training-loop API rows (OnlineMiner) were not run (`--no-online`)."
    )
    return [
        f"Mean ± std over {seeds} seed(s) for label noise and {rseeds} seed(s) for the retraining tasks (a "
        "seed fixes the data subset, the injected noise, the first model and the retraining draws). Model: "
        f"MLP {model}-{tr['hidden']}-C (`hardmine.zoo.FashionMLP` or the same shape for tabular inputs), Adam "
        f"lr {tr['lr']}, batch {tr['batch']}, "
        f"{tr['epochs']:g} epochs-equivalent of steps for every run: every retraining policy draws the same "
        "number of samples with replacement, from the same initialisation. hardmine scans the first model "
        "(trained on the observed labels) with `hardmine.scan` defaults (all layers, dim 256); its exports "
        "are drawn with `hardmine.ManifestSampler`. Higher is better everywhere except where a column says "
        "so; the best row per column is bold. `scripts/eval_quality.py"
        + ("" if fmnist else f" --dataset {meta['dataset']}")
        + f"` regenerates this file ({meta['seconds'] / 60:.1f} min with {meta['threads']} torch thread(s))."
        + online,
        "",
        f"Tasks: **label noise**, {z['noise_n']:,} training samples with {z['noise_rate']:.0%} symmetric "
        f"noise, or {z['noise_rate']:.0%} of each class of a confusable pair relabelled as its partner; "
        f"**hidden stratification**, superclasses of a majority class ({z['hs_major']:,} samples) and a "
        f"minority class ({minor:,}, {z['hs_minority']:.0%}), with and without {z['hs_noise']:.0%} extra "
        "symmetric label noise, tested on every test sample of those classes; **long tail**, classes with "
        f"n_c = {z['lt_max']:,} * {z['lt_ratio']:g}^(-c/(C-1)) (tail = the {z.get('lt_tail', 3)} rarest), "
        f"balanced test set. Pairs and superclasses: {meta.get('dataset_describe', '')}.",
        "",
    ]


def render_markdown(result: dict[str, Any]) -> str:
    meta, tasks = result["meta"], result["tasks"]
    seeds = len(meta["seeds"])
    rseeds = len(meta.get("retrain_seeds", meta["seeds"]))
    lines = [f"## Quality benchmark ({meta.get('dataset_title', 'Fashion-MNIST, MLP')})", ""]
    if meta["quick"]:
        lines += ["> **--quick smoke run: tiny sizes, one seed. These numbers support no claim.**", ""]
    lines += _intro(meta, seeds, rseeds)
    lines += _detection_table(tasks)
    lines += _minority_table(tasks)
    lines += _slice_f1_table(tasks)
    lines += _policy_table(
        tasks,
        ["hidden-strat", "hidden-strat+noise5"],
        [("acc", "acc"), ("worst", "worst-subclass"), ("minority_acc", "minority mean")],
        "### Hidden stratification: retraining at equal budget (%: test accuracy under the training mix; "
        "worst sub-class; mean over the minority sub-classes)",
    )
    lines += _policy_table(
        tasks,
        ["long-tail"],
        [("balanced_acc", "balanced acc"), ("tail_acc", "tail-class acc")],
        f"### Long tail (imbalance ratio {meta['sizes']['lt_ratio']:g}): retraining at equal budget (%)",
    )
    lines += _study_table(result.get("hardness_weights"))
    lines += _study_table(result.get("strategies"))
    if result.get("targets"):
        lines += [
            "### Targets from the issue",
            "",
            "| target | hardmine (mean) | bar (mean) | paired difference per seed (mean ± 95% interval) | met |",
            "|---|---|---|---|---|",
        ]
        for t in result["targets"]:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            ours = "n/a" if t["ours"] is None else f"{t['ours']:.3f}"
            ref = "n/a" if t["reference"] is None else f"{t['reference']:.3f}"
            paired = "; ".join(f"{k}: {fmt_ci(v)}" for k, v in (t.get("paired_diff") or {}).items())
            lines.append(f"| {t['target']} | {ours} | {ref} | {paired} | {met} |")
        lines.append("")
    rec = result.get("recommendation")
    if rec and rec.get("text"):
        lines += ["### What the evidence says", "", rec["text"], ""]
    knobs = meta["policy_knobs"]
    folds = meta["sizes"]["cv_folds"]
    lines += [
        f"Knobs: JTT upsamples the first model's errors x{knobs['jtt_up']:g}; loss-top-k boosts the top "
        f"{knobs['topk_top']:g} by loss x{knobs['topk_boost']:g} (the same top/boost as hardmine's top-k "
        "strategy, so only the ranking differs). Focal loss uses gamma 2. cleanlab gets out-of-sample "
        f"probabilities from {folds}-fold cross-validation with the same recipe ({folds}x the training compute "
        "of the single in-sample model that every other score uses). The online rows train with "
        '`hardmine.OnlineMiner(model, layers="classifier")` and its default `WeightingConfig` (objective '
        "`stats.weighted_loss()`), on ERM's draws, or on a `MinerSampler` refreshed with `miner.manifest()` after "
        "every epoch.",
        "",
    ]
    return "\n".join(lines)
