"""The issue's targets, judged on per-seed paired differences with 95% intervals (one dataset's tasks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .metrics import paired_interval

__all__ = ["CLEANLAB_ROW", "LOSS_ROW", "runs_metric", "paired", "targets_for", "margin_points"]

CLEANLAB_ROW = "cleanlab:label quality (K-fold)"
LOSS_ROW = "hardmine:loss"
MARGIN = 0.03  # hidden stratification: +3 points over the best of JTT / loss-top-k


def margin_points() -> float:
    return MARGIN


def runs_metric(tasks: dict[str, Any], t: str, pick: Callable[[dict[str, Any]], Any]) -> list[float]:
    """``pick(run)`` for every seed of task ``t`` (NaN where the row is missing)."""
    out = []
    for r in tasks.get(t, {}).get("runs", []):
        try:
            out.append(float(pick(r)))
        except (KeyError, TypeError):
            out.append(math.nan)
    return out


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    return paired_interval([x - y for x, y in zip(a, b, strict=True)])


def _mean(v: list[float]) -> float:
    f = [x for x in v if math.isfinite(x)]
    return sum(f) / len(f) if f else math.nan


def targets_for(tasks: dict[str, Any], label_issue_row: str | None, policy: str | None) -> list[dict[str, Any]]:
    """Targets of one dataset for the ``label_issue`` row and the export ``policy`` (row names)."""
    out: list[dict[str, Any]] = []
    for t in ("noise-symmetric", "noise-pairs"):
        if t not in tasks or label_issue_row is None:
            continue
        ours = runs_metric(tasks, t, lambda r: r["scores"][label_issue_row]["auroc"])
        refs = {
            name: runs_metric(tasks, t, lambda r, n=name: r["scores"][n]["auroc"]) for name in (CLEANLAB_ROW, LOSS_ROW)
        }
        bar = max(_mean(v) for v in refs.values())
        out.append(
            {
                "target": f"{t}: AUROC of label_issue >= max(cleanlab, loss)",
                "ours": _mean(ours),
                "reference": bar,
                "paired_diff": {f"vs {n.split(':')[0]} {n.split(':')[1].split(' ')[0]}": paired(ours, v) for n, v in refs.items()},
                "met": None if math.isnan(_mean(ours)) or math.isnan(bar) else bool(_mean(ours) >= bar),
            }
        )
    for t in ("hidden-strat", "hidden-strat+noise5"):
        pol = tasks.get(t, {}).get("summary", {}).get("policies", {})
        if not pol or policy is None:
            continue
        refs = [k for k in pol if k.startswith("JTT") or k.startswith("loss top-")]
        ours = runs_metric(tasks, t, lambda r: r["policies"][policy]["worst"])
        per = {k: runs_metric(tasks, t, lambda r, k=k: r["policies"][k]["worst"]) for k in refs}
        bar = max(_mean(v) for v in per.values()) + MARGIN
        out.append(
            {
                "target": f"{t}: worst-subclass acc of the default export >= max(JTT, loss-top-k) + 3 points",
                "ours": _mean(ours),
                "reference": bar,
                "paired_diff": {f"vs {k}": paired(ours, v) for k, v in per.items()},
                "met": None if math.isnan(_mean(ours)) or math.isnan(bar) else bool(_mean(ours) >= bar),
            }
        )
    if "long-tail" in tasks and policy is not None:
        cb = "class-balanced sampling"
        ours = runs_metric(tasks, "long-tail", lambda r: r["policies"][policy]["balanced_acc"])
        ref = runs_metric(tasks, "long-tail", lambda r: r["policies"][cb]["balanced_acc"])
        out.append(
            {
                "target": "long-tail: balanced acc of the default export >= class-balanced sampling",
                "ours": _mean(ours),
                "reference": _mean(ref),
                "paired_diff": {"vs class-balanced sampling": paired(ours, ref)},
                "met": None if math.isnan(_mean(ours)) else bool(_mean(ours) >= _mean(ref)),
            }
        )
    return out
