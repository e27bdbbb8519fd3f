"""hardmine's side of the benchmark, through its public API only: the calls a user makes.

``hardmine.scan(model, loader, out=...)`` -> ``Scan``; ``scan.manifest()`` (the manifest DataFrame);
``scan.rescore(hardmine.ScoreConfig(weights=...))``;
``hardmine.export_manifest(scan, strategy=..., out=...)``; ``hardmine.ManifestSampler(path, num_samples=...,
seed=...)``; ``hardmine.OnlineMiner`` / ``hardmine.MinerSampler`` for the training-loop rows. Score directions
come from the table the manifest itself documents (``hardmine.score.SCORE_TABLE``).
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

import hardmine

from .data import Task
from .metrics import auroc
from .train import TrainConfig, make_mlp, weighted_indices

__all__ = ["api", "HardmineRunner", "SIGNAL_COLUMNS", "WEIGHTINGS", "label_issue_row"]

logger = logging.getLogger(__name__)

# Where each public name lives, for a checkout whose hardmine/__init__.py does not re-export it yet.
_HOME = {
    "scan": "hardmine.scan",
    "Scan": "hardmine.scan",
    "ScoreConfig": "hardmine.score",
    "export_manifest": "hardmine.manifest",
    "ManifestSampler": "hardmine.sampler",
    "Strategy": "hardmine.enums",
    "OnlineMiner": "hardmine.online",
    "MinerSampler": "hardmine.online",
    "default_strategy": "hardmine.score",
    "SliceEmbedding": "hardmine.enums",
    "LabelIssueMethod": "hardmine.enums",
}


def api(name: str) -> Any:
    """``hardmine.<name>``; falls back to the defining module while ``__init__`` does not export it yet."""
    obj = getattr(hardmine, name, None)
    if obj is not None and not isinstance(obj, types.ModuleType):
        return obj
    try:
        return getattr(importlib.import_module(_HOME[name]), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(
            f"hardmine.{name} is not available in this checkout ({exc}); run with --baselines-only."
        ) from None


# Every manifest column that is a per-sample score (reported as a row of the AUROC tables).
SIGNAL_COLUMNS = (
    "hardness",
    "loss",
    "el2n",
    "grad_norm",
    "margin",
    "class_divergence",
    "global_divergence",
    "class_divergence_plain",
    "global_divergence_plain",
    "class_distance",
    "knn_outlier",
    "neighbor_disagreement",
    "confident_error",
)

# Hardness weightings compared on the same scans. "default" is whatever the library ships
# (hardmine.score.DEFAULT_WEIGHTS); the others are single signals and pairs/triples built from the
# best-performing families, so the study can tell whether a different default would clearly win.
WEIGHTINGS: dict[str, dict[str, float]] = {
    "loss": {"loss": 1.0},
    "margin": {"margin": 1.0},
    "el2n": {"el2n": 1.0},
    "loss + class_divergence": {"loss": 1.0, "class_divergence": 1.0},
    "loss + class_distance": {"loss": 1.0, "class_distance": 1.0},
    "loss + knn_outlier/2": {"loss": 1.0, "knn_outlier": 0.5},
    "loss + neighbor_disagreement/2": {"loss": 1.0, "neighbor_disagreement": 0.5},
    "margin + class_divergence": {"margin": 1.0, "class_divergence": 1.0},
    "margin + class_distance": {"margin": 1.0, "class_distance": 1.0},
    "el2n + class_distance": {"el2n": 1.0, "class_distance": 1.0},
    "loss + margin + class_distance": {"loss": 1.0, "margin": 1.0, "class_distance": 1.0},
    "loss + grad_norm": {"loss": 1.0, "grad_norm": 1.0},
    "margin + grad_norm": {"margin": 1.0, "grad_norm": 1.0},
    "el2n + grad_norm": {"el2n": 1.0, "grad_norm": 1.0},
    "margin + neighbor_disagreement/2": {"margin": 1.0, "neighbor_disagreement": 0.5},
    "margin + grad_norm + neighbor_disagreement/2": {
        "margin": 1.0,
        "grad_norm": 1.0,
        "neighbor_disagreement": 0.5,
    },
    "loss + class_divergence + knn_outlier/2": {"loss": 1.0, "class_divergence": 1.0, "knn_outlier": 0.5},
    "loss + class_distance + knn_outlier/2": {"loss": 1.0, "class_distance": 1.0, "knn_outlier": 0.5},
    # The provisional default before this benchmark chose one (kept to show what the switch changed).
    "loss + class_divergence + knn_outlier/2 + neighbor_disagreement/2": {
        "loss": 1.0,
        "class_divergence": 1.0,
        "knn_outlier": 0.5,
        "neighbor_disagreement": 0.5,
    },
}
# Retraining metrics the strategy and weight studies compare: (task, metric).
_RETRAIN_COLUMNS = (
    ("hidden-strat", "worst"),
    ("hidden-strat+noise5", "worst"),
    ("long-tail", "balanced_acc"),
)

SHORTFALL = "worst-case shortfall"
# The strategy rule's accuracy constraint: an export may cost at most this much test accuracy (fraction)
# against ERM on the noisy hidden-stratification task, where oversampling hard samples means oversampling
# the noise.
ACC_DROP = "noise5 acc drop vs ERM"
MAX_ACC_DROP = 0.02

# Signals computed from the model output alone (everything else needs the gradients).
OUTPUT_SIGNALS = {"loss", "margin", "el2n", "confidence", "correct", "confident_error", "near_miss"}

# A sharper per-class export (hard samples weigh more inside each class) is tried beside the defaults.
PER_CLASS_SHARP = 3.0
SLICES_OTHER_BOOSTS = (5.0, 2.0, 1.0, 0.5)  # slice_boost values tried beside the library's default

# Detection settings the weightings are compared on: (task, which planted truth).
_STUDY_COLUMNS = (
    ("noise-symmetric", "noisy"),
    ("noise-pairs", "noisy"),
    ("hidden-strat", "minority"),
    ("hidden-strat+noise5", "minority"),
)


def _oriented(df: pd.DataFrame, col: str) -> np.ndarray:
    """Column ``col`` turned so that higher = harder (the manifest's own direction table decides)."""
    table = importlib.import_module("hardmine.score").SCORE_TABLE
    sign = table[col].orientation if col in table and table[col].orientation != 0 else 1
    v = pd.array(df[col], dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return sign * v


def label_issue_row(method: str) -> str:
    """Row name of a ``label_issue`` formula in the detection tables."""
    return f"hardmine:label_issue[{method}]"


def _row_name(col: str) -> str:
    table = importlib.import_module("hardmine.score").SCORE_TABLE
    neg = col in table and table[col].orientation < 0
    return f"hardmine:{col}" + (" (negated)" if neg else "") + (" (default)" if col == "hardness" else "")


class HardmineRunner:
    """Scans each first model, hands its signals to the harness, and turns exports into index streams."""

    def __init__(self, workdir: Path, quick: bool, dim: int = 256, batch: int = 512) -> None:
        self.workdir = Path(workdir)
        self.quick = quick
        self.dim = dim
        self.batch = batch
        self.scan_fn = api("scan")
        self.ScoreConfig = api("ScoreConfig")
        self.export_manifest = api("export_manifest")
        self.ManifestSampler = api("ManifestSampler")
        self.Strategy = api("Strategy")
        self.default_config = self.ScoreConfig()
        # The study compares every signal, the neighbour scores too: ask for them where the library computes
        # them only on request (ScoreConfig.neighbor_scores); the default scores and exports are unchanged.
        fields = getattr(self.ScoreConfig, "__dataclass_fields__", {})
        self.scan_extra: dict[str, Any] = (
            {"score_config": self.ScoreConfig(neighbor_scores=True)} if "neighbor_scores" in fields else {}
        )
        # Every task here is classification: strategy=None resolves to the classification default.
        configured = self.default_config.strategy
        self.default_strategy = (
            self.Strategy(configured).value if configured is not None else api("default_strategy")(True).value
        )
        # (task name, seed) -> default scan's manifest frame and the planted truth, for the weight study.
        self.frames: dict[tuple[str, int], tuple[pd.DataFrame, np.ndarray, np.ndarray]] = {}
        self.scan_dirs: dict[tuple[str, int], Path] = {}
        # policy row name -> {"strategy", "temperature", "weighting"} (weighting "default" = library weights)
        self.policy_meta: dict[str, dict[str, Any]] = {}
        c = self.default_config
        # Export variants tried for every weighting: the library's strategies at their defaults, and per-class
        # at a sharper temperature (hard samples weigh more inside each class).
        # A variant is (strategy, knob): the temperature, except for slices (which ignore it): the boost.
        self.slice_boost = float(importlib.import_module("hardmine.defaults").DEFAULT_SLICE_BOOST)
        self.variants: list[tuple[str, float]] = [
            (st.value, self.slice_boost if st.value == "slices" else float(c.temperature)) for st in self.Strategy
        ]
        if ("per-class", PER_CLASS_SHARP) not in self.variants:
            self.variants.append(("per-class", PER_CLASS_SHARP))
        # The slices export at other slice boosts beside the library's.
        self.variants += [("slices", b) for b in SLICES_OTHER_BOOSTS if ("slices", b) not in self.variants]
        slices = importlib.import_module("hardmine.slices")
        self.default_slice_embedding = slices.DEFAULT_SLICE_EMBEDDING.value
        self.label_issue_methods = [m.value for m in api("LabelIssueMethod")]
        self.default_label_issue = importlib.import_module("hardmine.label_issues").DEFAULT_LABEL_ISSUE_METHOD.value

    # ---------------------------------------------------------------------------------------- facts
    def defaults(self) -> dict[str, float]:
        c = self.default_config
        return {"top": float(c.top), "boost": float(c.boost)}

    def default_names(self) -> dict[str, str]:
        return {
            "score": "hardmine:hardness (default)",
            "policy": self.policy_name(self.default_strategy),
            "label_issue": label_issue_row(self.default_label_issue),
        }

    def policy_name(
        self, strategy: str, weighting: str | None = None, temperature: float | None = None
    ) -> str:
        """Row name of a manifest policy; "(default)" marks the library's default export exactly."""
        c = self.default_config
        t = c.temperature if temperature is None else temperature
        knob = {
            "top-k": f"top {c.top:g} x{c.boost:g}",
            "proportional": f"hardness^{t:g}",
            "per-class": f"hardness^{t:g} per class",
            "slices": f"slice error rate x{self.slice_boost if temperature is None else t:g}, label issues not boosted",
        }.get(strategy, "")
        knob_default = self.slice_boost if strategy == "slices" else c.temperature
        if strategy == "slices" and temperature is None:
            t = self.slice_boost
        is_default = strategy == self.default_strategy and weighting is None and t == knob_default
        w = f", weights: {weighting}" if weighting else ""
        name = f"hardmine manifest: {strategy} [{knob}{w}]" + (" (default)" if is_default else "")
        self.policy_meta[name] = {"strategy": strategy, "temperature": t, "weighting": weighting or "default"}
        return name

    def describe(self) -> dict[str, Any]:
        c = self.default_config
        return {
            "call": f"hardmine.scan(model, DataLoader(batch_size={self.batch}), out=..., dim={self.dim}, "
            "seed=seed" + (", score_config=ScoreConfig(neighbor_scores=True))" if self.scan_extra else ")"),
            "layers": "all (the default)",
            "score_config": c.to_dict(),
            "default_weights": dict(c.weights),
            "default_strategy": self.default_strategy,
        }

    # ---------------------------------------------------------------------------------------- scanning
    def scan_signals(
        self, model: torch.nn.Module, task: Task, seed: int, ref: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float], Any]:
        out = self.workdir / f"{task.name}-seed{seed}"
        loader = DataLoader(TensorDataset(task.x, task.y), batch_size=self.batch, shuffle=False)
        scan = self.scan_fn(model, loader, out=out, dim=self.dim, seed=seed, overwrite=True, **self.scan_extra)
        df = scan.manifest().sort_values("sample_id", kind="stable").reset_index(drop=True)
        if not np.array_equal(df["sample_id"].to_numpy(), np.arange(len(task.y))):
            raise RuntimeError("manifest sample ids are not the dataset positions 0..N-1")
        self.frames[(task.name, seed)] = (df, task.is_noisy.copy(), task.is_minority.copy())
        self.scan_dirs[(task.name, seed)] = out
        signals = {_row_name(c): _oriented(df, c) for c in SIGNAL_COLUMNS if c in df}
        label_issue_score = importlib.import_module("hardmine.label_issues").label_issue_score
        for m in self.label_issue_methods:
            signals[label_issue_row(m)] = label_issue_score(df, m)
        check = {
            "loss_max_abs_diff": float(np.max(np.abs(df["loss"].to_numpy(dtype=np.float64) - ref["loss"]))),
            "el2n_max_abs_diff": float(np.max(np.abs(df["el2n"].to_numpy(dtype=np.float64) - ref["el2n"]))),
            "scan_timings": dict(scan.info.get("timings", {})),
            "out_dim": int(scan.out_dim),
        }
        return signals, check, scan

    def slice_candidates(self, scan: Any, y: np.ndarray, seed: int, feature_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Slice ids per embedding candidate: the scan's own ``slice`` column (the library's default
        embedding), the other library embedding re-clustered from the stored gradients with the same rule and
        seed, and the first model's penultimate features (GEORGE's embedding)."""
        sl = importlib.import_module("hardmine.slices")
        df = scan.manifest().sort_values("sample_id", kind="stable")
        out = {self.default_slice_embedding: df["slice"].astype(str).to_numpy()}
        layout = scan.engine_metadata.get("layout")
        for emb in api("SliceEmbedding"):
            if emb.value in out:
                continue
            cols = sl.embedding_columns(layout, emb)
            out[emb.value] = sl.fit_slices(scan.iter_gradients, y.astype(np.int64), seed=seed, columns=cols).ids(y)
        out["features"] = feature_ids
        return out

    def slice_weights(self, scan: Any, ids: np.ndarray) -> np.ndarray:
        """The ``slices`` export's weights with the slice column replaced by ``ids`` (dataset order)."""
        df = scan.manifest().sort_values("sample_id", kind="stable").reset_index(drop=True)
        df["slice"] = ids
        weight, _ = importlib.import_module("hardmine.manifest").compute_weights(df, "slices")
        return weight

    def _draw(self, path: Path, n_draws: int, seed: int) -> torch.Tensor:
        sampler = self.ManifestSampler(str(path), num_samples=n_draws, replacement=True, seed=seed)
        return torch.as_tensor(list(iter(sampler)), dtype=torch.int64)

    def _export_variants(
        self, scan: Any, n_draws: int, seed: int, weighting: str | None, variants: list[tuple[str, float]]
    ) -> dict[str, Callable[[], torch.Tensor]]:
        out: dict[str, Callable[[], torch.Tensor]] = {}
        slug = "".join(ch if ch.isalnum() else "_" for ch in (weighting or "default"))
        for strategy, temperature in variants:
            path = Path(scan.path) / f"export-{slug}-{strategy}-t{temperature:g}.parquet"

            knobs = {"slice_boost": temperature} if strategy == "slices" else {"temperature": temperature}

            def draw(strategy: str = strategy, knobs: dict[str, float] = knobs, path: Path = path) -> torch.Tensor:
                self.export_manifest(scan, strategy=strategy, out=str(path), **knobs)
                return self._draw(path, n_draws, seed)

            out[self.policy_name(strategy, weighting=weighting, temperature=temperature)] = draw
        return out

    def policies(self, scan: Any, n_draws: int, seed: int) -> dict[str, Callable[[], torch.Tensor]]:
        """One index stream per export variant of the default scan, drawn by ``ManifestSampler`` from the
        exported Parquet file."""
        out = self._export_variants(scan, n_draws, seed, None, self.variants)
        # The label-issue guard measured: per-class on the same manifest without `is_label_issue`
        # (as written before it existed), so flagged samples are weighted like any other.
        frame = scan.manifest()
        meta = frame.attrs.get("hardmine", {})
        frame = frame.drop(columns=["is_label_issue"])
        frame.attrs["hardmine"] = meta
        path = Path(scan.path) / "export-no-guard.parquet"
        strategy = "per-class"
        name = self.policy_name(strategy).removesuffix(" (default)").removesuffix("]") + ", label issues boosted too]"
        self.policy_meta[name] = {"strategy": strategy, "temperature": self.default_config.temperature, "weighting": "no guard"}

        def draw() -> torch.Tensor:
            self.export_manifest(frame, strategy=strategy, out=str(path))
            return self._draw(path, n_draws, seed)

        out[name] = draw
        return out

    def weighted_policies(
        self, task_name: str, seed: int, weighting: str, n_draws: int, draw_seed: int
    ) -> tuple[dict[str, Callable[[], torch.Tensor]], float]:
        """Rescore a stored scan with other hardness weights (``Scan.rescore(ScoreConfig(weights=...))``: no
        gradient is recomputed) and return one index stream per export variant except ``proportional``
        (never competitive with the library weights, so not worth the trainings).

        Also returns the largest difference between the rescored ``hardness`` and the composite the weight
        study computes from the default manifest's columns (they must agree: same formula, same signals).
        The scan is left rescored with ``weighting``; the harness deletes it afterwards."""
        composite = importlib.import_module("hardmine.score").composite_hardness
        scan = api("Scan").open(self.scan_dirs[(task_name, seed)])
        w = WEIGHTINGS[weighting]
        rescored = scan.rescore(self.ScoreConfig(weights=w)).sort_values("sample_id", kind="stable")
        df0 = self.frames[(task_name, seed)][0]
        expected, _ = composite({c: df0[c].array for c in w}, w)
        diff = float(np.max(np.abs(rescored["hardness"].to_numpy(dtype=np.float64) - expected)))
        variants = [v for v in self.variants if v[0] != "proportional"]
        return self._export_variants(scan, n_draws, draw_seed, weighting, variants), diff

    # ---------------------------------------------------------------------------------------- online
    def online_available(self) -> bool:
        try:
            api("OnlineMiner"), api("MinerSampler")
        except SystemExit:
            return False
        return True

    def online_train(
        self, task: Task, cfg: TrainConfig, init_seed: int, draw_seed: int, n_draws: int, refresh: bool
    ) -> tuple[torch.nn.Module, torch.Tensor]:
        """Train a fresh model (same init, recipe and number of samples as every other policy) with the
        training-loop API: ``OnlineMiner.observe`` gives per-sample weights, the objective is
        ``stats.weighted_loss()``. ``refresh=False``: the draws are ERM's (uniform, with replacement), so
        only the weighting differs. ``refresh=True``: the draws come from a ``MinerSampler`` refreshed with
        ``miner.manifest()`` after every epoch, as in ``scripts/example_training_loop.py``."""
        miner_cls, sampler_cls = api("OnlineMiner"), api("MinerSampler")
        n = len(task.y)
        model = make_mlp(task.n_classes, cfg.hidden, init_seed, in_features=task.x.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        n_steps = n_draws // cfg.batch
        miner = miner_cls(
            model, layers="classifier", num_classes=task.n_classes, dim=self.dim, seed=init_seed
        )
        sampler = sampler_cls(n, seed=draw_seed) if refresh else None
        stream = None if refresh else weighted_indices(np.ones(n), n_draws, draw_seed)
        drawn: list[torch.Tensor] = []
        model.train()
        try:
            step, epoch = 0, 0
            while step < n_steps:
                if sampler is not None:
                    sampler.set_epoch(epoch)
                    idx = torch.as_tensor(list(iter(sampler)), dtype=torch.int64)  # one epoch of draws
                else:
                    idx = stream
                for b in idx[: (len(idx) // cfg.batch) * cfg.batch].reshape(-1, cfg.batch):  # (steps, B)
                    if step == n_steps:
                        break
                    stats = miner.observe(task.x[b], task.y[b], b)
                    opt.zero_grad(set_to_none=True)
                    stats.weighted_loss().backward()
                    opt.step()
                    drawn.append(b)
                    step += 1
                if sampler is not None:
                    sampler.refresh(miner.manifest())
                epoch += 1
        finally:
            miner.close()
        model.eval()
        return model, torch.cat(drawn)

    def drop_scan(self, task_name: str, seed: int) -> None:
        d = self.scan_dirs.pop((task_name, seed), None)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- studies
    def weightings(self) -> dict[str, dict[str, float]]:
        return {"default": dict(self.default_config.weights), **WEIGHTINGS}

    def weighting_aurocs(self) -> dict[str, dict[str, list[float]]]:
        """AUROC of every weighting's composite hardness on every stored scan: name -> column -> per seed.

        Uses ``hardmine.score.composite_hardness`` on the manifest's own columns, which is exactly what
        ``Scan.rescore`` computes for ``hardness`` (checked once per run in ``weight_study``)."""
        composite = importlib.import_module("hardmine.score").composite_hardness
        res: dict[str, dict[str, list[float]]] = {}
        for name, w in self.weightings().items():
            res[name] = {}
            for task_name, truth in _STUDY_COLUMNS:
                vals = []
                for (t, _seed), (df, noisy, minority) in sorted(self.frames.items()):
                    if t != task_name:
                        continue
                    h, _ = composite({c: df[c].array for c in w}, w)
                    vals.append(auroc(h, noisy if truth == "noisy" else minority))
                if vals:
                    res[name][f"{task_name} ({truth})"] = vals
        return res

    def weight_study(self, tasks: Mapping[str, Any]) -> dict[str, Any]:
        from .metrics import mean_std

        per = self.weighting_aurocs()
        cols = sorted(
            {c for v in per.values() for c in v},
            key=lambda c: [s for s, _ in _STUDY_COLUMNS].index(c.split(" (")[0]),
        )
        rows: dict[str, dict[str, Any]] = {}
        for name, v in per.items():
            rows[name] = {c: mean_std(v[c]) for c in cols if c in v}
            flat = [np.mean(v[c]) for c in cols if c in v]
            rows[name]["mean AUROC"] = {
                "mean": float(np.mean(flat)) if flat else math.nan,
                "std": 0.0,
                "n": len(flat),
            }
        for name, short in self._shortfalls(per).items():
            rows[name][SHORTFALL] = {"mean": short, "std": 0.0, "n": 1}
        # Retraining results (default strategy at its default temperature) of the weightings retrained.
        c = self.default_config
        retrain: dict[str, dict[str, Any]] = {}
        for tname, metric in _RETRAIN_COLUMNS:
            for pname, r in tasks.get(tname, {}).get("summary", {}).get("policies", {}).items():
                meta = self.policy_meta.get(pname)
                if (
                    meta
                    and meta["strategy"] == self.default_strategy
                    and meta["temperature"] == c.temperature
                ):
                    retrain.setdefault(meta["weighting"], {})[f"{tname} {metric}"] = r.get(metric)
        for wname, cells in retrain.items():
            if wname in rows:
                rows[wname].update(cells)
        all_cols = (
            cols
            + ["mean AUROC", SHORTFALL]
            + [f"{t} {m}" for t, m in _RETRAIN_COLUMNS if any(f"{t} {m}" in r for r in retrain.values())]
        )
        return {
            "title": "Hardness weightings compared (same scans; AUROC, then retraining metrics)",
            "row_label": "weighting",
            "note": (
                "Composite `hardness` under each weighting on the same scans as above (mean ± std over "
                f"seeds); the retraining columns use the default export ({self.default_strategy}) and are "
                "filled only for the weightings that were retrained. 'default' = the library's current "
                f"DEFAULT_WEIGHTS {dict(c.weights)}. '{SHORTFALL}' is the largest gap, over the four detection settings, "
                "between this weighting's mean AUROC and the best weighting's: the rule that picks a default "
                "(no setting where it is far from the best); unlike every other column, lower is better."
            ),
            "weights": self.weightings(),
            "columns": all_cols,
            "rows": rows,
        }

    def strategy_study(self, tasks: Mapping[str, Any]) -> dict[str, Any]:
        """Every (weighting, export) combination that was retrained, on the three retraining metrics and
        their mean (the strategy rule), plus in-distribution accuracy under label noise (the cost side)."""
        from .metrics import mean_std

        cols = [f"{t} {m}" for t, m in _RETRAIN_COLUMNS] + [
            "mean of the three",
            "hidden-strat+noise5 acc",
            ACC_DROP,
        ]
        erm = tasks.get("hidden-strat+noise5", {}).get("summary", {}).get("policies", {}).get("ERM", {})
        erm_acc = (erm.get("acc") or {}).get("mean")
        rows: dict[str, dict[str, Any]] = {}
        for pname in self.policy_meta:
            cells: dict[str, Any] = {}
            for tname, metric in _RETRAIN_COLUMNS + (("hidden-strat+noise5", "acc"),):
                r = tasks.get(tname, {}).get("summary", {}).get("policies", {}).get(pname)
                if r and isinstance(r.get(metric), dict):
                    cells[f"{tname} {metric}"] = r[metric]
            if all(f"{t} {m}" in cells for t, m in _RETRAIN_COLUMNS):
                cells["mean of the three"] = mean_std(
                    [np.mean([cells[f"{t} {m}"]["mean"] for t, m in _RETRAIN_COLUMNS])]
                )
                acc = cells.get("hidden-strat+noise5 acc")
                if erm_acc is not None and acc is not None:
                    cells[ACC_DROP] = mean_std([erm_acc - acc["mean"]])
                rows[pname.removeprefix("hardmine manifest: ")] = cells

        constraint = erm_acc is not None  # needs the noisy hidden-stratification task with its ERM row

        def admissible(cells: Mapping[str, Any]) -> bool:
            if not constraint:
                return True
            drop = cells.get(ACC_DROP)
            return drop is not None and drop["mean"] <= MAX_ACC_DROP  # unmeasured cost: not admissible
        return {
            "title": "Export strategy x hardness weighting (retraining at equal budget)",
            "row_label": "export [knobs, weights]",
            "scale": 100.0,  # accuracies, shown in %
            "note": (
                "Every hardmine manifest that was retrained (%, mean ± std over seeds), ordered by the "
                "strategy rule: exports that cost at most "
                f"{100 * MAX_ACC_DROP:g} points of test accuracy against ERM under label noise "
                f"('{ACC_DROP}', lower is better) come first, each group best first by 'mean of the three'. "
                "An export that oversamples the noise buys worst-sub-class accuracy with overall accuracy; "
                "the rule does not let that trade pick the default."
                + (
                    ""
                    if constraint
                    else " (Not applied in this run: no ERM row on the noisy hidden-stratification task.)"
                )
            ),
            "columns": cols,
            "rows": dict(
                sorted(rows.items(), key=lambda kv: (not admissible(kv[1]), -kv[1]["mean of the three"]["mean"]))
            ),
            "admissible": [k for k, v in rows.items() if admissible(v)],
            "constraint_applied": constraint,
        }

    @staticmethod
    def _shortfalls(per: Mapping[str, Mapping[str, list[float]]]) -> dict[str, float]:
        """Per weighting: max over detection settings of (best weighting's mean AUROC - this one's)."""
        cols = sorted({c for v in per.values() for c in v})
        full = {n: v for n, v in per.items() if all(c in v for c in cols)}
        if not full:
            return {}
        best = {c: max(float(np.mean(v[c])) for v in full.values()) for c in cols}
        return {n: max(best[c] - float(np.mean(v[c])) for c in cols) for n, v in full.items()}

    def pick_retrain_weightings(self, n: int) -> list[str]:
        """Weightings to retrain with, in this order: the one with the smallest worst-case AUROC shortfall
        (the default-picking rule) among those using model-output signals only, then among those using a
        gradient signal."""
        short = self._shortfalls(self.weighting_aurocs())
        same_as_default = {k for k, w in WEIGHTINGS.items() if w == dict(self.default_config.weights)}
        ranked = sorted((k for k in short if k != "default" and k not in same_as_default), key=lambda k: short[k])
        output_only = [k for k in ranked if set(WEIGHTINGS[k]) <= OUTPUT_SIGNALS]
        gradient = [k for k in ranked if not set(WEIGHTINGS[k]) <= OUTPUT_SIGNALS]
        return (output_only[:1] + gradient[:1])[:n]

    def recommend(self, tasks: Mapping[str, Any], study: Mapping[str, Any] | None) -> dict[str, Any]:
        """Which score, weighting and strategy win, by the rules in ``rules``, with a generated summary."""
        rec: dict[str, Any] = {
            "rules": {
                "score": "highest mean AUROC over the detection settings it is measured on",
                "weights": (
                    "smallest worst-case shortfall: max over the four detection settings (noise x2, "
                    "minority x2) of the gap to the best weighting's mean AUROC"
                ),
                "strategy": (
                    "highest mean over worst-subclass (hidden-strat, both) and balanced acc (long-tail), "
                    f"among exports costing at most {100 * MAX_ACC_DROP:g} points of accuracy vs ERM under "
                    "label noise"
                ),
            }
        }
        text: list[str] = []

        def best_score(key: str, names: tuple[str, ...]) -> tuple[str, dict[str, float]] | None:
            per: dict[str, dict[str, float]] = {}
            for t in names:
                for row, v in tasks.get(t, {}).get("summary", {}).get(key, {}).items():
                    m = (v.get("auroc") or {}).get("mean")
                    if m is not None:
                        per.setdefault(row, {})[t] = m
            full = {r: v for r, v in per.items() if len(v) == len(names)}
            if not full:
                return None
            best = max(full, key=lambda r: float(np.mean(list(full[r].values()))))
            return best, full[best]

        fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
        default_row = "hardmine:hardness (default)"
        for key, names, what in (
            ("scores", ("noise-symmetric", "noise-pairs"), "label-noise AUROC"),
            ("minority_scores", ("hidden-strat", "hidden-strat+noise5"), "minority AUROC"),
        ):
            b = best_score(key, names)
            if b is None:
                continue
            rec[f"best_{key}"] = {"name": b[0], "auroc": b[1]}
            dflt = {
                t: tasks[t]["summary"][key].get(default_row, {}).get("auroc", {}).get("mean") for t in names
            }
            text.append(
                f"- Best single score for {what}: `{b[0]}` ({fmt(b[1])}); default `hardness`: "
                f"{fmt({k: v for k, v in dflt.items() if v is not None})}."
            )
        if study and study.get("rows"):
            rows = study["rows"]
            ok = {k: r for k, r in rows.items() if SHORTFALL in r}
            best = min(ok, key=lambda k: ok[k][SHORTFALL]["mean"])
            best_mean = max(rows, key=lambda k: rows[k]["mean AUROC"]["mean"])
            rec["weights"] = {
                "name": best,
                "weights": study["weights"][best],
                "shortfall": ok[best][SHORTFALL]["mean"],
                "mean_auroc": rows[best]["mean AUROC"]["mean"],
                "default_shortfall": ok["default"][SHORTFALL]["mean"],
                "default_mean_auroc": rows["default"]["mean AUROC"]["mean"],
                "best_mean_auroc": {"name": best_mean, "value": rows[best_mean]["mean AUROC"]["mean"]},
            }
            text.append(
                f"- Hardness weighting with the smallest worst-case AUROC shortfall: `{best}` = "
                f"{study['weights'][best]} (shortfall {ok[best][SHORTFALL]['mean']:.3f}, mean AUROC "
                f"{rows[best]['mean AUROC']['mean']:.3f}); the current default: shortfall "
                f"{ok['default'][SHORTFALL]['mean']:.3f}, mean AUROC "
                f"{rows['default']['mean AUROC']['mean']:.3f}. "
                f"Best mean AUROC: `{best_mean}` ({rows[best_mean]['mean AUROC']['mean']:.3f})."
            )
        study_s = self.strategy_study(tasks)
        if study_s["rows"]:
            rows_s = study_s["rows"]
            best = next(iter(rows_s))  # sorted best first (admissible exports before the others)
            applied = study_s.get("constraint_applied", False)
            if applied and best not in study_s.get("admissible", []):
                best_note = " (no export met the accuracy constraint; the best one is shown anyway)"
            else:
                best_note = ""
            rec["strategy"] = {
                "name": best,
                "meta": self.policy_meta.get(f"hardmine manifest: {best}"),
                "mean_metric": {k: v["mean of the three"]["mean"] for k, v in rows_s.items()},
                "constraint_applied": applied,
            }
            top3 = list(rows_s.items())[:3]
            dflt = self.policy_name(self.default_strategy).removeprefix("hardmine manifest: ")
            dflt_value = (
                f"{100 * rows_s[dflt]['mean of the three']['mean']:.1f}%." if dflt in rows_s else "n/a."
            )
            among = (
                f", among those costing at most {100 * MAX_ACC_DROP:g} points of accuracy vs ERM under label "
                "noise"
                if applied
                else "; the accuracy constraint was not applied (no noisy hidden-stratification ERM row)"
            )
            text.append(
                "- Exports by the strategy rule (mean of worst-subclass on both hidden-stratification tasks "
                f"and long-tail balanced accuracy{among}): "
                + ", ".join(f"`{k}` {100 * v['mean of the three']['mean']:.1f}%" for k, v in top3)
                + f"{best_note}; the current default `{dflt}`: {dflt_value}"
            )
        rec["text"] = "\n".join(text)
        return rec
