"""Quality benchmark on real data: does hardmine's manifest make the next model better than the baselines?

Runs on Fashion-MNIST (Debian ``dataset-fashion-mnist``) with a small MLP, fixed seeds, and hardmine's public
API only (``hardmine.scan``, the scan's manifest, ``hardmine.export_manifest``, ``hardmine.ManifestSampler``).

Tasks (see ``evalkit/data.py``):
  1. label noise, 20k images: 10% symmetric, and 10% between confusable pairs; detection AUROC and precision
     at the true noise rate for every hardmine signal and for cleanlab (K-fold out-of-sample probabilities);
  2. hidden stratification: 5 superclasses of majority + 5% minority class, with and without 5% extra label
     noise; minority AUROC per signal, then retraining at equal budget with each resampling policy;
  3. long tail: 10 classes, exponential imbalance ratio 100; balanced and tail-class accuracy per policy.

``--quick`` is a smoke run (tiny sizes, one seed, no claims) for CI. The full run writes
``scripts/results/eval_quality.json`` and ``scripts/results/eval_quality.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hardmine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evalkit/ beside this script

from evalkit import baselines as bl  # noqa: E402
from evalkit.data import (  # noqa: E402
    DATASETS,
    DatasetSpec,
    make_hidden_strat_task,
    make_long_tail_task,
    make_noise_task,
)
from evalkit.metrics import mean_std  # noqa: E402
from evalkit.report import render_markdown  # noqa: E402
from evalkit.runner import (  # noqa: E402
    ONLINE_NAME,
    ONLINE_REFRESH_NAME,
    Settings,
    retrain_weightings,
    run_detection,
    run_retrain_task,
)
from evalkit.targets import targets_for  # noqa: E402
from evalkit.train import TrainConfig  # noqa: E402

logger = logging.getLogger("eval_quality")

RESULTS = Path(__file__).resolve().parent / "results"

# Sizes. FULL follows the issue; QUICK only has to exercise every code path in well under a minute.
# Retraining comparisons are much noisier across seeds than detection AUROCs, so they get more seeds.
FULL = {
    "seeds": 5,
    "retrain_seeds": 5,
    "noise_rate": 0.10,
    "hs_noise": 0.05,
    "cv_folds": 5,
}
QUICK = {
    "seeds": 1,
    "retrain_seeds": 1,
    "noise_n": 1500,
    "noise_rate": 0.10,
    "hs_major": 300,
    "hs_noise": 0.05,
    "lt_max": 300,
    "epochs": 2.0,
    "cv_folds": 3,
}


def _sizes(spec: DatasetSpec, quick: bool) -> dict[str, Any]:
    """The dataset's task sizes (``DatasetSpec``), with the quick run's smaller ones on top."""
    base = {
        "noise_n": spec.noise_n,
        "hs_major": spec.hs_major,
        "hs_minority": spec.hs_minority,
        "lt_max": spec.lt_max,
        "lt_ratio": spec.lt_ratio,
        "lt_tail": spec.lt_tail,
        "epochs": spec.epochs,
    }
    over = dict(QUICK if quick else FULL)
    if quick:  # never ask for more samples than the dataset has
        over["hs_major"] = min(over["hs_major"], spec.hs_major)
        over["lt_max"] = min(over["lt_max"], spec.lt_max)
        over["noise_n"] = min(over["noise_n"], spec.noise_n)
        over["epochs"] = max(over["epochs"], spec.epochs / 3)
    return {**base, **over}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean_nan(o: Any) -> Any:
    """JSON has no NaN: write null instead (the Markdown shows 'n/a')."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean_nan(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean_nan(v) for v in o]
    return o


# ------------------------------------------------------------------------------------------------ aggregation
def _summarise_scores(runs: list[dict[str, Any]], key: str) -> dict[str, dict[str, dict[str, float]]]:
    names = list(runs[0][key])
    return {n: {m: mean_std([r[key][n][m] for r in runs]) for m in runs[0][key][n]} for n in names}


def _summarise_policies(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, first in runs[0]["policies"].items():
        if "status" in first:  # a row without numbers (e.g. not yet available)
            out[name] = dict(first)
            continue
        metrics = [k for k, v in first.items() if isinstance(v, float)]
        out[name] = {m: mean_std([r["policies"][name][m] for r in runs]) for m in metrics}
    return out


def _summarise(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"noise_rate": mean_std([r["noise_rate"] for r in runs])}
    if kind == "detection":
        s["scores"] = _summarise_scores(runs, "scores")
        s["first_model_test_acc"] = mean_std([r["first_model_test_acc"] for r in runs])
        if "cleanlab_find_label_issues" in runs[0]:
            s["cleanlab_find_label_issues"] = {
                m: mean_std([r["cleanlab_find_label_issues"][m] for r in runs])
                for m in ("n_flagged", "precision", "recall")
            }
    else:
        if "minority_scores" in runs[0]:
            s["minority_scores"] = _summarise_scores(runs, "minority_scores")
        if "slice_f1" in runs[0]:
            s["slice_f1"] = {e: mean_std([r["slice_f1"][e] for r in runs]) for e in runs[0]["slice_f1"]}
        s["policies"] = _summarise_policies(runs)
    return s


# ------------------------------------------------------------------------------------------------ targets
def _m(d: dict[str, Any] | None) -> float:
    return math.nan if not d else float(d.get("mean", math.nan))


def _targets(tasks: dict[str, Any], hm_default: dict[str, str] | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the numbers it was judged on (means over seeds) and the paired
    per-seed differences with 95% intervals; met=None when not measurable."""
    return targets_for(tasks, hm_default["label_issue"] if hm_default else None, hm_default["policy"] if hm_default else None)


# ------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = DATASETS[args.dataset]
    size = _sizes(spec, args.quick)
    if args.seeds is not None:
        size["seeds"] = size["retrain_seeds"] = args.seeds
    cfg = TrainConfig(epochs=size["epochs"])
    use_cleanlab = bl.cleanlab_available()
    if not use_cleanlab and not args.quick:
        raise SystemExit(
            "cleanlab/scikit-learn are not installed: pip install -e '.[bench]' (full runs need them)."
        )
    hm_runner = None
    if not args.baselines_only:
        from evalkit.hm import HardmineRunner

        hm_runner = HardmineRunner(workdir=Path(args.workdir), quick=args.quick)
    defaults = hm_runner.defaults() if hm_runner else {}
    top = float(defaults.get("top", 0.1))
    boost = float(defaults.get("boost", 5.0))
    # Same knobs for the baselines as for hardmine's top-k strategy, so only the ranking differs.
    s = Settings(
        cfg,
        size["cv_folds"],
        jtt_up=boost,
        topk_top=top,
        topk_boost=boost,
        use_cleanlab=use_cleanlab,
        hm=hm_runner,
        online=not args.no_online,
    )
    train, test = spec.load("train"), spec.load("test")
    seeds = list(range(size["seeds"]))
    retrain_seeds = list(range(size["retrain_seeds"]))
    tasks: dict[str, Any] = {}
    t_all = time.perf_counter()
    # name -> (kind, task factory taking a seed); a factory rebuilds the identical task from its seed.
    factories: dict[str, tuple[str, Any]] = {}
    if "noise" in args.tasks:
        for kind in ("symmetric", "pairs"):
            factories[f"noise-{kind}"] = (
                "detection",
                lambda seed, kind=kind: make_noise_task(
                    kind, seed, size["noise_n"], size["noise_rate"], train, test, spec.confusable_pairs,
                    spec.n_classes,
                ),
            )
    if "hidden" in args.tasks:
        for noise in (0.0, size["hs_noise"]):
            name = "hidden-strat" + (f"+noise{int(round(noise * 100))}" if noise > 0 else "")
            factories[name] = (
                "retrain",
                lambda seed, noise=noise: make_hidden_strat_task(
                    seed, size["hs_major"], size["hs_minority"], noise, train, test, spec.superclass_pairs
                ),
            )
    if "longtail" in args.tasks:
        factories["long-tail"] = (
            "retrain",
            lambda seed: make_long_tail_task(
                seed, size["lt_max"], size["lt_ratio"], train, test, spec.lt_tail, spec.n_classes
            ),
        )

    for name, (kind, make) in factories.items():
        runs = []
        for seed in seeds if kind == "detection" else retrain_seeds:
            t0 = time.perf_counter()
            task = make(seed)
            if kind == "detection":
                runs.append(run_detection(task, s, seed))
                if hm_runner is not None:
                    hm_runner.drop_scan(name, seed)  # only its manifest frame is needed later
            else:
                runs.append(run_retrain_task(task, s, seed, detect_minority=name.startswith("hidden")))
            runs[-1]["seconds"] = time.perf_counter() - t0
            logger.info("%s seed %d: %.1fs", name, seed, runs[-1]["seconds"])
        tasks[name] = {"kind": kind, "runs": runs}

    # Phase 2: the hardness weightings that detect best are also retrained (default strategy), from the
    # stored scans rescored with their weights, so the weight study has retraining evidence too.
    if hm_runner is not None and args.retrain_weightings > 0:
        picks = hm_runner.pick_retrain_weightings(args.retrain_weightings)
        logger.info("retraining with weightings %s", picks)
        for name, (kind, make) in factories.items():
            if kind != "retrain":
                continue
            for run_ in tasks[name]["runs"]:
                seed = run_["seed"]
                t0 = time.perf_counter()
                extra = retrain_weightings(make(seed), s, seed, picks)
                online = {
                    k: run_["policies"].pop(k)
                    for k in (ONLINE_NAME, ONLINE_REFRESH_NAME)
                    if k in run_["policies"]
                }
                run_["policies"].update(extra)
                run_["policies"].update(online)  # keep the online rows last
                run_["seconds"] += time.perf_counter() - t0
                hm_runner.drop_scan(name, seed)
    for entry in tasks.values():
        entry["summary"] = _summarise(entry["kind"], entry["runs"])

    hm_default = hm_runner.default_names() if hm_runner else None
    result: dict[str, Any] = {
        "meta": {
            "quick": bool(args.quick),
            "claims": not args.quick,
            "dataset": spec.name,
            "dataset_title": spec.title,
            "dataset_describe": spec.describe,
            "n_classes": spec.n_classes,
            "online_rows": not args.no_online,
            "seeds": seeds,
            "retrain_seeds": retrain_seeds,
            "sizes": size,
            "train": cfg.as_dict(),
            "policy_knobs": {"jtt_up": s.jtt_up, "topk_top": s.topk_top, "topk_boost": s.topk_boost},
            "hardmine": hm_runner.describe() if hm_runner else {"status": "not run (--baselines-only)"},
            "hardmine_version": hardmine.__version__,
            "torch": torch.__version__,
            "cleanlab": _version("cleanlab") if use_cleanlab else None,
            "sklearn": _version("sklearn") if use_cleanlab else None,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t_all,
        },
        "tasks": tasks,
    }
    if hm_runner is not None:
        result["hardness_weights"] = hm_runner.weight_study(tasks)
        result["strategies"] = hm_runner.strategy_study(tasks)
    result["targets"] = _targets(tasks, hm_default)
    result["recommendation"] = (
        hm_runner.recommend(tasks, result.get("hardness_weights")) if hm_runner else None
    )
    return _clean_nan(json.loads(json.dumps(result, default=_json_default)))


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (one seed, no claims), < 60 s")
    ap.add_argument(
        "--dataset", default="fashion-mnist", choices=sorted(DATASETS), help="which real dataset (default fashion-mnist)"
    )
    ap.add_argument(
        "--no-online", action="store_true", help="skip the training-loop API rows (OnlineMiner), which cost the most"
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds for every task (default 5; quick: 1)",
    )
    ap.add_argument("--tasks", default="noise,hidden,longtail", help="comma list of noise,hidden,longtail")
    ap.add_argument("--baselines-only", action="store_true", help="skip hardmine (baseline rows only)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default scripts/results/eval_quality.json)"
    )
    ap.add_argument("--md", type=Path, default=None, help="Markdown path (default: --out with .md)")
    ap.add_argument(
        "--retrain-weightings",
        type=int,
        default=None,
        help="also retrain with the N best-detecting non-default hardness weightings (default 2; quick: 1)",
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where scans are written (default: a temp dir)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these models are tiny, and on a shared CPU two threads "
        "spin-waiting on each other ran 3-4x slower than one)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    args.tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    bad = args.tasks - {"noise", "hidden", "longtail"}
    if bad or not args.tasks:
        ap.error(f"--tasks {sorted(bad) or 'empty'} is not valid; use a comma list of noise,hidden,longtail")
    if args.retrain_weightings is None:
        args.retrain_weightings = 1 if args.quick else 2
    if args.retrain_weightings < 0:
        ap.error(f"--retrain-weightings {args.retrain_weightings} must be >= 0")
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds {args.seeds} must be >= 1")
    # A quick run never overwrites the committed results: without --out it writes to the temp folder.
    stem = "eval_quality" if args.dataset == "fashion-mnist" else f"eval_quality_{args.dataset.replace('-', '_')}"
    out = args.out or (
        Path(tempfile.gettempdir()) / f"{stem}_quick.json" if args.quick else RESULTS / f"{stem}.json"
    )
    md = args.md or out.with_suffix(".md")
    if args.threads < 1:
        ap.error(f"--threads {args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # every model and draw below also takes its own explicit seed/generator
    with tempfile.TemporaryDirectory(prefix="hardmine-eval-") as tmp:
        if args.workdir is None:
            args.workdir = Path(tmp)
        result = run(args)
    _atomic_write(out, json.dumps(result, indent=1, sort_keys=False) + "\n")
    _atomic_write(md, render_markdown(result))
    print(render_markdown(result))
    print(f"wrote {out} and {md} ({result['meta']['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
