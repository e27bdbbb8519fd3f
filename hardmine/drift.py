"""Drift between two scans of the same model and projection: is the new data still like the training data?

``drift(reference, new)`` compares a *new* scan (e.g. this week's production or test data) with a *reference*
scan (the training data) of the same checkpoint and projection (``hardmine.attribution.check_comparable``:
anything else is refused, naming what differs). Nothing is extracted again: both scans' stored gradients and
the reference's FAISS index are read in blocks.

Per new sample (``drift.parquet``, one row per sample of the new scan, keyed by ``sample_id``):

=====================  ====================================================================================
column                 meaning
=====================  ====================================================================================
``familiarity``        mean ``|cos|`` of the sample's gradient to its ``k`` nearest reference gradients
                       (by ``|cos|``, as ``neighbor_disagreement`` counts neighbours)
``distance``           ``1 - familiarity``
``nearest_id``         ``sample_id`` of the most similar reference sample; ``nearest_similarity`` its cosine
``unfamiliar``         ``distance > threshold``: far from everything seen in the reference data
``ref_slice``          the reference slice the sample falls into (when the reference manifest has ``slice``):
                       the slice with the largest summed ``|cos|`` among its ``k`` nearest reference samples
``label`` ``pred``     the new scan's own label, prediction and ``correct`` (classification scans)
``correct``
=====================  ====================================================================================

The threshold comes from the reference's own distribution: each reference sample's ``distance`` to its ``k``
nearest *other* reference samples (leave-one-out; at most ``THRESHOLD_SAMPLE`` reference samples, a seeded
draw, for large references), and ``threshold`` = its ``quantile`` (default ``DEFAULT_QUANTILE`` = 0.99).
So, by construction, data drawn from the reference distribution is flagged ``unfamiliar`` at a rate of about
``1 - quantile`` (the *expected* rate); more than that means new data the model has not seen.

Per class (by label) and, when the reference has slices, per reference slice (``summary.json``): ``n`` and
share of the samples in reference and new (for slices, the reference samples are assigned by the same vote as
the new ones, over their ``k`` nearest *other* reference samples, so both share vectors come from one rule;
the k-means membership of ``slices.parquet`` would differ from the vote even without drift), the new samples' unfamiliar rate, and where labels exist the
failure rate (``1 - correct``), the confident-error rate and the ECE (``hardmine.slices
.expected_calibration_error``) in both. Shift statistics between the two share vectors:

- total-variation distance ``TV = ½ Σ_g |p_ref(g) - p_new(g)|`` (0 = same shares, 1 = disjoint);
- Pearson's chi-square test of homogeneity on the 2 × G table of counts (``chi2``, ``dof = G - 1`` over the
  groups seen in either scan, ``p_value``).

Summary ``score`` (in [0, 1]) = the largest of

- ``unfamiliar_excess = max(0, unfamiliar_rate - (1 - quantile))``: the share of new data unlike anything in
  the reference, beyond what the reference flags in itself;
- ``class_tv``: the share of new data that would have to change class to match the reference's class mix.

Both are "fractions of the new data that are not like the reference", so one threshold reads the same for
either (``hardmine drift --fail-above 0.05``: fail a monitoring job when more than 5% is new). The slice TV
is reported but not in the score: with many small slices it is noisy even without drift.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ._io import TMP_PREFIX, atomic_path, atomic_write_json, utc_now
from ._version import __version__
from .attribution import check_comparable
from .checks import as_bool, non_negative_int, number_in, positive_int
from .manifest import bool_column, float_column
from .scan import Scan
from .slices import expected_calibration_error

__all__ = [
    "DEFAULT_K",
    "DEFAULT_QUANTILE",
    "THRESHOLD_SAMPLE",
    "DRIFT_FILE",
    "SUMMARY_FILE",
    "DRIFT_FORMAT",
    "DriftResult",
    "check_output_dir",
    "drift",
    "share_shift",
    "read_drift",
]

logger = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_QUANTILE = 0.99
THRESHOLD_SAMPLE = 20_000  # reference samples whose own neighbour distances set the threshold (seeded draw)
QUERY_BLOCK = 2048  # new samples searched per FAISS call
DRIFT_FILE = "drift.parquet"
SUMMARY_FILE = "summary.json"
DRIFT_FORMAT = "hardmine-drift"
_METADATA_KEY = b"hardmine"


@dataclass(frozen=True)
class DriftResult:
    """What ``drift`` computed: the per-sample frame (``drift.parquet``) and the summary (``summary.json``)."""

    samples: pd.DataFrame
    summary: dict[str, Any]

    @property
    def score(self) -> float:
        return float(self.summary["score"])


def _as_scan(source: Scan | str | os.PathLike[str], what: str) -> Scan:
    if isinstance(source, Scan):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Scan.open(source)
    raise ValueError(f"{what} must be a Scan or a scan directory, got {type(source).__name__} {source!r}.")


def check_output_dir(out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Where a drift report may be written: a new or empty directory, or one holding an earlier drift report
    (its files are replaced); any other non-empty directory only with ``overwrite``; never a file."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {str(p)!r} is a file; give a directory for drift.parquet and summary.json.")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        if not _is_drift_dir(p):
            raise ValueError(
                f"{str(p)!r} is not empty and holds no earlier drift report; refusing to write into it. Choose "
                "another directory, or pass overwrite=True to write there anyway."
            )
    if not p.exists() and not p.parent.exists():
        raise ValueError(f"cannot create {p}: directory {p.parent} does not exist.")
    return p


def _is_drift_dir(p: Path) -> bool:
    try:
        return json.loads((p / SUMMARY_FILE).read_text()).get("format") == DRIFT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def drift(
    reference: Scan | str | os.PathLike[str],
    new: Scan | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    k: int = DEFAULT_K,
    quantile: float = DEFAULT_QUANTILE,
    seed: int = 0,
    overwrite: bool = False,
) -> DriftResult:
    """Compare scan ``new`` with scan ``reference`` (same model and projection); see the module docstring.

    Args:
        reference: the reference scan (usually of the training data), a ``Scan`` or its directory.
        new: the scan of the new data.
        out: if given, a directory that receives ``drift.parquet`` and ``summary.json`` (atomic writes; created
            if missing; an earlier drift report there is replaced, any other non-empty directory only with
            ``overwrite=True``).
        k: reference neighbours per sample (``1 <= k < reference samples``).
        quantile: the quantile of the reference's own neighbour distances above which a sample is
            ``unfamiliar`` (in (0, 1); 0.99 flags about 1% of reference-like data).
        seed: seeds the draw of reference samples that set the threshold (only for references larger than
            ``THRESHOLD_SAMPLE``).
        overwrite: allow writing into a non-empty ``out`` that holds no drift report.
    """
    k = positive_int(k, "k", hint="reference neighbours per sample")
    number_in(quantile, "quantile", 0.0, 1.0, hint="e.g. 0.99")
    quantile = float(quantile)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile!r} must be strictly between 0 and 1, e.g. 0.99.")
    as_bool(overwrite, "overwrite")
    seed = non_negative_int(seed, "seed")
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    ref, other = _as_scan(reference, "reference"), _as_scan(new, "new")
    check_comparable(ref, other)
    if k >= ref.n_samples:
        if ref.n_samples < 2:  # no k works: a reference sample's own neighbours leave it out
            raise ValueError(
                f"the reference scan {ref.path} has {ref.n_samples} sample(s); drift needs at least 2 (k=1) to "
                "compare new samples with: scan more reference data."
            )
        raise ValueError(f"k={k} needs more reference samples than the {ref.n_samples} in {ref.path}; use k < {ref.n_samples}.")
    result = _compute_drift(ref, other, k, quantile, int(seed))
    if out is not None:
        _write(Path(out), result)
    return result


# ----------------------------------------------------------------------------------------------- compute
def _familiarity(sims: np.ndarray) -> np.ndarray:
    a = np.abs(sims)  # (q, k); a missing neighbour (NaN) drops out of the mean
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(a), a, np.nan), axis=1)  # (q,)


def _reference_pass(ref: Scan, k: int, seed: int, ref_slice: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Leave-one-out ``1 - mean |cos|`` of (a seeded draw of) reference samples to their k nearest others,
    their rows, and their slices by the same vote as the new samples' (so the two share vectors are made
    by one rule)."""
    n = ref.n_samples
    rows = np.arange(n)
    if n > THRESHOLD_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(n, THRESHOLD_SAMPLE, replace=False))
    ids = ref.sample_ids()
    dist, voted = [], []
    for lo in range(0, len(rows), QUERY_BLOCK):
        chosen = ids[rows[lo : lo + QUERY_BLOCK]]
        res = ref.neighbors(chosen.tolist(), k=k, absolute=True)  # ids: the sample itself is excluded
        dist.append(1.0 - _familiarity(res.similarities))
        if ref_slice is not None:
            voted.append(_vote_slice(res.rows, res.similarities, ref_slice))
    return np.concatenate(dist), rows, (np.concatenate(voted) if voted else None)


def _vote_slice(rows: np.ndarray, sims: np.ndarray, ref_slice: np.ndarray) -> np.ndarray:
    """Per query, the reference slice with the largest summed ``|cos|`` among its neighbours (ties: the
    nearest neighbour's slice wins, as it is counted first)."""
    out = np.empty(len(rows), dtype=object)
    for i in range(len(rows)):
        score: dict[str, float] = {}
        for r, s in zip(rows[i].tolist(), np.abs(sims[i]).tolist()):
            if r < 0 or not math.isfinite(s):
                continue
            name = ref_slice[r]
            if name is None:
                continue
            score[name] = score.get(name, 0.0) + s
        out[i] = max(score, key=score.__getitem__) if score else None
    return out


def _manifest_by_row(scan: Scan) -> pd.DataFrame:
    """The manifest in the scan's row order (the manifest is in scan order; checked by sample_id)."""
    m = scan.manifest()
    ids = scan.sample_ids()
    if len(m) != len(ids) or not np.array_equal(m["sample_id"].to_numpy(), ids):
        m = m.set_index("sample_id", drop=False).loc[ids.tolist()].reset_index(drop=True)
    return m


def _compute_drift(ref: Scan, new: Scan, k: int, quantile: float, seed: int) -> DriftResult:
    ref_m = _manifest_by_row(ref)
    new_m = _manifest_by_row(new)
    has_slices = "slice" in ref_m and bool(ref_m["slice"].notna().any())
    ref_slice = (
        np.array([None if v is None or v is pd.NA or v != v else str(v) for v in ref_m["slice"].tolist()], dtype=object)
        if has_slices else None
    )
    ref_dist, ref_rows, ref_voted = _reference_pass(ref, k, seed, ref_slice)
    finite = ref_dist[np.isfinite(ref_dist)]
    if len(finite) == 0:
        raise ValueError(f"the reference scan {ref.path} has no usable gradients (all zero?); nothing to compare with.")
    threshold = float(np.quantile(finite, quantile))
    ref_ids = ref.sample_ids()
    fam, near_sim, near_row, slices = [], [], [], []
    for _, z in new.iter_gradients(QUERY_BLOCK):
        res = ref.neighbors(np.asarray(z, dtype=np.float32), k=k, absolute=True)  # vectors: nothing excluded
        fam.append(_familiarity(res.similarities))
        near_sim.append(res.similarities[:, 0])
        near_row.append(res.rows[:, 0])
        if ref_slice is not None:
            slices.append(_vote_slice(res.rows, res.similarities, ref_slice))
    familiarity = np.concatenate(fam)
    distance = 1.0 - familiarity
    rows0 = np.concatenate(near_row)
    fill: Any = -1 if ref_ids.dtype.kind in "iu" else ""
    samples = pd.DataFrame(
        {
            "sample_id": new.sample_ids(),
            "familiarity": familiarity,
            "distance": distance,
            "nearest_id": np.where(rows0 >= 0, ref_ids[np.maximum(rows0, 0)], fill),
            "nearest_similarity": np.concatenate(near_sim),
            # NaN distance (a zero gradient has no direction) is not evidence of novelty: not flagged.
            "unfamiliar": np.nan_to_num(distance, nan=-np.inf) > threshold,
        }
    )
    samples["ref_slice"] = pd.array(np.concatenate(slices) if slices else [None] * len(samples), dtype="string")
    for col in ("label", "pred", "correct"):
        if col in new_m:
            samples[col] = new_m[col].to_numpy()
    summary = _summary(ref, new, ref_m, new_m, samples, ref_dist, ref_rows, ref_voted, threshold, k, quantile, seed)
    return DriftResult(samples=samples, summary=summary)


# ---------------------------------------------------------------------------------------------- statistics
def share_shift(ref_counts: pd.Series, new_counts: pd.Series) -> dict[str, float]:
    """Shift between two count vectors over groups (indexed by group): total-variation distance of the
    shares, Pearson's chi-square of homogeneity on the 2 × G table, its degrees of freedom and p-value."""
    groups = ref_counts.index.union(new_counts.index)
    a = ref_counts.reindex(groups, fill_value=0).to_numpy(dtype=np.float64)  # (G,)
    b = new_counts.reindex(groups, fill_value=0).to_numpy(dtype=np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return {"tv": math.nan, "chi2": math.nan, "dof": 0, "p_value": math.nan}
    tv = 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())
    table = np.stack([a, b])  # (2, G)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()  # (2, G)
    keep = expected.sum(0) > 0
    chi2 = float((((table - expected) ** 2)[:, keep] / expected[:, keep]).sum())
    dof = int(keep.sum()) - 1
    # chi2.sf(x, dof) = Q(dof/2, x/2), the regularised upper incomplete gamma function (torch, no scipy).
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64))) if dof > 0 else 1.0
    return {"tv": tv, "chi2": chi2, "dof": dof, "p_value": p}




def _rates(df: pd.DataFrame, mask: np.ndarray) -> dict[str, float]:
    ok = bool_column(df, "correct")[mask]
    ce = bool_column(df, "confident_error")[mask]
    conf = float_column(df, "pred_confidence")[mask]
    return {
        "failure_rate": _nanmean(1.0 - ok),
        "confident_error_rate": _nanmean(ce),
        "ece": expected_calibration_error(conf, ok) if len(ok) else math.nan,
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def _group_table(
    ref_m: pd.DataFrame, new_m: pd.DataFrame, ref_groups: np.ndarray, new_groups: np.ndarray, unfamiliar: np.ndarray,
    name: str,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rc = pd.Series(ref_groups).dropna().value_counts()
    nc = pd.Series(new_groups).dropna().value_counts()
    shift = share_shift(rc, nc)
    rows = []
    for g in sorted(rc.index.union(nc.index), key=lambda v: (str(type(v)), v)):
        rmask, nmask = ref_groups == g, new_groups == g
        r, n = _rates(ref_m, rmask), _rates(new_m, nmask)
        rows.append(
            {
                name: g.item() if hasattr(g, "item") else g,
                "n_reference": int(rmask.sum()),
                "n_new": int(nmask.sum()),
                "share_reference": float(rmask.sum() / max(len(ref_groups), 1)),
                "share_new": float(nmask.sum() / max(len(new_groups), 1)),
                "unfamiliar_rate_new": _nanmean(unfamiliar[nmask].astype(np.float64)),
                **{f"{key}_reference": v for key, v in r.items()},
                **{f"{key}_new": v for key, v in n.items()},
            }
        )
    return rows, shift


def _summary(
    ref: Scan, new: Scan, ref_m: pd.DataFrame, new_m: pd.DataFrame, samples: pd.DataFrame, ref_dist: np.ndarray,
    ref_rows: np.ndarray, ref_voted: np.ndarray | None, threshold: float, k: int, quantile: float, seed: int,
) -> dict[str, Any]:
    unfamiliar = samples["unfamiliar"].to_numpy(dtype=bool)
    rate = float(unfamiliar.mean())
    expected = 1.0 - quantile
    excess = max(0.0, rate - expected)
    # class labels on both sides (a causal LM's manifest has no label column, a regression's float labels)
    labelled = all("label" in m and m["label"].to_numpy().dtype.kind in "iu" for m in (ref_m, new_m))
    per_class: list[dict[str, Any]] = []
    class_shift = {"tv": math.nan, "chi2": math.nan, "dof": 0, "p_value": math.nan}
    if labelled:
        per_class, class_shift = _group_table(
            ref_m, new_m, ref_m["label"].to_numpy(), new_m["label"].to_numpy(), unfamiliar, "label"
        )
    per_slice: list[dict[str, Any]] = []
    slice_shift = {"tv": math.nan, "chi2": math.nan, "dof": 0, "p_value": math.nan}
    if ref_voted is not None and samples["ref_slice"].notna().any():
        new_sl = samples["ref_slice"].to_numpy(dtype=object, na_value=None)
        ref_sub = ref_m.iloc[ref_rows].reset_index(drop=True)  # (the reference samples that were queried)
        per_slice, slice_shift = _group_table(ref_sub, new_m, ref_voted, new_sl, unfamiliar, "slice")
    class_tv = class_shift["tv"]
    score = max(excess, 0.0 if not math.isfinite(class_tv) else class_tv)
    return {
        "format": DRIFT_FORMAT,
        "format_version": 1,
        "hardmine_version": __version__,
        "created": utc_now(),
        "reference": str(ref.path),
        "new": str(new.path),
        "model_fingerprint": ref.config.get("model_fingerprint"),
        "reference_dataset_fingerprint": ref.info.get("dataset_fingerprint"),
        "new_dataset_fingerprint": new.info.get("dataset_fingerprint"),
        "n_reference": ref.n_samples,
        "n_new": new.n_samples,
        "k": k,
        "quantile": quantile,
        "seed": seed,
        "threshold_rule": f"distance = 1 - mean |cos| to the {k} nearest reference gradients; unfamiliar when "
                          f"distance > the {quantile} quantile of the reference samples' own leave-one-out distances",
        "threshold": threshold,
        "threshold_samples": int(len(ref_dist)),
        "reference_mean_distance": _nanmean(ref_dist),
        "new_mean_distance": _nanmean(samples["distance"].to_numpy(dtype=np.float64)),
        "unfamiliar": int(unfamiliar.sum()),
        "unfamiliar_rate": rate,
        "expected_unfamiliar_rate": expected,
        "unfamiliar_excess": excess,
        "class_tv": class_tv,
        "class_chi2": class_shift["chi2"],
        "class_dof": class_shift["dof"],
        "class_p_value": class_shift["p_value"],
        "slice_tv": slice_shift["tv"],
        "slice_chi2": slice_shift["chi2"],
        "slice_dof": slice_shift["dof"],
        "slice_p_value": slice_shift["p_value"],
        "reference_overall": _rates(ref_m, np.ones(len(ref_m), dtype=bool)),
        "new_overall": _rates(new_m, np.ones(len(new_m), dtype=bool)),
        "score_rule": "max(unfamiliar_excess, class_tv)",
        "score": float(score),
        "per_class": per_class,
        "per_slice": per_slice,
    }


# --------------------------------------------------------------------------------------------------- files
def _write(out: Path, result: DriftResult) -> None:
    if not out.exists():
        # A new directory is filled under a temporary name and renamed: a failed write leaves no half report.
        tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            _write_files(tmp, result)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        _write_files(out, result)
    logger.info("drift: wrote %s and %s", out / DRIFT_FILE, out / SUMMARY_FILE)


def _write_files(out: Path, result: DriftResult) -> None:
    df = result.samples
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {k: v for k, v in result.summary.items() if k not in ("per_class", "per_slice")}
    table = table.replace_schema_metadata({_METADATA_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
    with atomic_path(out / DRIFT_FILE) as tmp:
        pq.write_table(table, tmp)
    atomic_write_json(out / SUMMARY_FILE, _json_safe(result.summary))


def _json_safe(obj: Any) -> Any:
    """NaN -> None, so summary.json is strict JSON any monitoring tool reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def read_drift(directory: str | os.PathLike[str]) -> DriftResult:
    """Read a drift report directory written by ``drift(..., out=...)``."""
    p = Path(directory)
    if not _is_drift_dir(p) or not (p / DRIFT_FILE).is_file():
        raise ValueError(f"{p} holds no drift report ({SUMMARY_FILE} and {DRIFT_FILE}); run hardmine drift first.")
    return DriftResult(samples=pq.read_table(p / DRIFT_FILE).to_pandas(), summary=json.loads((p / SUMMARY_FILE).read_text()))
