"""``hardmine scan CHECKPOINT DATA --out SCAN_DIR``: scan a checkpoint plus a dataset."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..enums import DataFormat, Engine, IndexKind, LossKind, ScanPhase, TaskKind, TokenReduction
from ._common import emit_json, handle_errors, parse_shape, stderr
from .cmd_show import print_table

__all__ = ["scan_command"]


class _SpeedColumn(ProgressColumn):
    """items/s of a task (rich has bytes/s only)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} items/s" if speed else "- items/s", style="progress.data.speed")


class _RichProgress:
    """Adapts ``hardmine.scan``'s progress callback to one rich bar per phase, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(), _SpeedColumn(),
            TimeRemainingColumn(), console=stderr, disable=quiet, transient=False,
        )
        self.tasks: dict[ScanPhase, Any] = {}

    def __call__(self, p: Any) -> None:
        task = self.tasks.get(p.phase)
        if task is None:
            task = self.tasks[p.phase] = self.progress.add_task(p.phase.value, total=p.total)
        self.progress.update(task, completed=p.done, total=p.total)


@handle_errors
def scan_command(
    checkpoint: Path = typer.Argument(..., help="State dict (.pt/.pth/.bin/.safetensors), torch.export archive (.pt2) or HF model dir."),
    data: str = typer.Argument(..., help="Parquet/CSV/.npz file, HF datasets dir, IDX dir, or pkg.module:factory."),
    out: Path = typer.Option(..., "--out", "-o", help="Scan directory to write (created; resumed if interrupted)."),
    model: str | None = typer.Option(None, "--model", help="pkg.module:factory building the architecture of a state dict."),
    state_key: str | None = typer.Option(None, "--state-key", help="Entry of a wrapped checkpoint holding the state dict."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Allow unpickling a whole saved model (runs code from the file)."),
    allow_new_head: bool = typer.Option(
        False, "--allow-new-head",
        help="Scan a Hugging Face model whose classification head is not in the checkpoint, with a new head drawn "
             "from a fixed seed (recorded in the scan); refused otherwise.",
    ),
    format: DataFormat = typer.Option(DataFormat.AUTO, "--format", help="Data format (auto-detected by default)."),
    split: str = typer.Option("train", "--split", help="Split of IDX / HF datasets data."),
    no_labels: bool = typer.Option(
        False, "--no-labels",
        help="Unlabelled data (a classifier only): no label column is read; each sample's target is the model's "
             "prediction, and the columns that need true labels are null.",
    ),
    label_column: str = typer.Option("label", "--label-column", help="Column holding the labels (class ids, or numbers for regression)."),
    id_column: str | None = typer.Option(None, "--id-column", help="Column of sample ids (default: 0-based row index)."),
    feature_column: str | None = typer.Option(None, "--feature-column", help="One list/array column of features."),
    feature_columns: str | None = typer.Option(None, "--feature-columns", help="Glob of numeric feature columns, e.g. 'pix_*'."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Per-sample input shape, e.g. 1,28,28."),
    text_column: str | None = typer.Option(
        None, "--text-column",
        help="Text column, tokenised with the HF model's tokenizer (a causal LM: the loss is on every token).",
    ),
    task: TaskKind = typer.Option(
        TaskKind.AUTO, "--task",
        help="auto: a causal LM when the model (its class / HF config) or the columns below say so, else from the "
             "labels and --loss.",
    ),
    prompt_column: str | None = typer.Option(
        None, "--prompt-column", help="Causal LM: prompt column (never a target); needs --completion-column.",
    ),
    completion_column: str | None = typer.Option(
        None, "--completion-column", help="Causal LM: completion column, the only target tokens (plus end of sequence).",
    ),
    messages_column: str | None = typer.Option(
        None, "--messages-column",
        help="Causal LM: conversation column (a list of {role, content}, or its JSON), rendered with the tokenizer's "
             "chat template; the assistant turns are the targets.",
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", min=2,
        help="Tokens per text sample; longer ones are cut and counted (default: 512 for a causal LM, 128 otherwise).",
    ),
    token_reduction: TokenReduction = typer.Option(
        TokenReduction.MEAN, "--token-reduction",
        help="Causal LM: a sample's loss is the mean (default) or the sum of its target tokens' NLL.",
    ),
    class_names: str | None = typer.Option(
        None, "--class-names",
        help="Comma-separated class names, one per class of the model, class 0 first: text labels get their "
             "class ids from it (without it: a trained HF head's id2label names, else their sorted names, which "
             "must then be every class of the model); recorded in the scan and shown by show/slices/review "
             "(default: those names, or a HF dataset's ClassLabel names).",
    ),
    layers: str | None = typer.Option(None, "--layers", help="Comma-separated module names/globs (default: all)."),
    dim: int = typer.Option(256, "--dim", min=1, help="Projection dimension per selected parameter tensor."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the random projections (same seed, same vectors)."),
    engine: Engine = typer.Option(Engine.AUTO, "--engine", help="auto: factored where a layer rule exists, vmap for the rest."),
    loss: LossKind = typer.Option(LossKind.AUTO, "--loss", help="auto: cross_entropy (integer or text class labels; a single-logit model: BCE); mse: regression (number labels); bce: multi-label (0/1 rows)."),
    num_classes: int | None = typer.Option(None, "--num-classes", min=1, help="Check labels against this many classes."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Samples per forward/backward pass (lower it when memory is short)."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="DataLoader worker processes for factory datasets."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Scan only the first N samples."),
    index: IndexKind = typer.Option(IndexKind.AUTO, "--index", help="FAISS index: auto picks exact flat search for small scans and IVF for large ones."),
    build_index: bool = typer.Option(
        False, "--build-index",
        help="Build the FAISS index during the scan. By default the first neighbour query (hardmine neighbors, "
             "drift, review, report) builds it and keeps it: no default score uses it.",
    ),
    neighbor_scores: bool = typer.Option(
        False, "--neighbor-scores",
        help="Also compute knn_outlier and neighbor_disagreement from every sample's gradient neighbours (off by "
             "default: no default score uses them, and at scale they cost several times the extraction).",
    ),
    shard_rows: int = typer.Option(8192, "--shard-rows", min=1, help="Samples per shard: the resume granularity."),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs",
        help="On a CUDA device, replay the factored pass as a CUDA graph: the same vectors, less host time per "
             "batch (applies when every selected layer is factored; switches itself off with a warning otherwise).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a scan with different options in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Scan CHECKPOINT on DATA: per-sample gradients, index, scores and a ranked manifest in --out."""
    import torch

    from ..loaders import load_model, open_data, open_text
    from ..loaders.text import DEFAULT_MAX_LENGTH
    from ..scan import scan as run_scan
    from ..scan.distributed import rank_and_world, rank_device
    from ..scan.extraction import ClassCountError
    from ..scan.task import looks_causal_lm

    if os.getcwd() not in sys.path:  # --model / factory specs resolve like `python -m`
        sys.path.insert(0, os.getcwd())
    shape = parse_shape(input_shape)
    rank, _ = rank_and_world()  # under torchrun: every rank scans its part, rank 0 alone reports
    dev = rank_device(_device(device))  # cuda -> cuda:LOCAL_RANK under torchrun
    t0 = time.perf_counter()
    lm_columns = any(c is not None for c in (prompt_column, completion_column, messages_column))
    if lm_columns and task not in (TaskKind.AUTO, TaskKind.CAUSAL_LM):
        raise typer.BadParameter(
            f"--prompt-column/--completion-column/--messages-column are causal-LM options; --task is {task.value}."
        )
    load_task = task
    if task is TaskKind.AUTO and lm_columns:
        load_task = TaskKind.CAUSAL_LM
    elif task is TaskKind.AUTO and (allow_new_head or num_classes is not None):
        load_task = TaskKind.CLASSIFICATION  # a classifier's options: never read a base LM directory as an LM
    loaded = load_model(checkpoint, model, state_key=state_key, unsafe_pickle=unsafe_pickle, num_labels=num_classes,
                        allow_new_head=allow_new_head, task=load_task.value)
    net = loaded.model.to(dev)
    lm = task is TaskKind.CAUSAL_LM or (task is TaskKind.AUTO and (lm_columns or bool(looks_causal_lm(loaded.model))))
    if lm:
        if no_labels:
            raise typer.BadParameter("--no-labels is for classifiers; a causal LM's targets are its own tokens.")
        if loss is not LossKind.AUTO:
            raise typer.BadParameter(
                f"--loss {loss.value} does not apply to a causal LM, which is scanned with its next-token loss "
                "(see --token-reduction)."
            )
        src = open_text(
            data, loaded.tokenizer, format=format, text_column=text_column, prompt_column=prompt_column,
            completion_column=completion_column, messages_column=messages_column, id_column=id_column,
            max_length=max_length or DEFAULT_MAX_LENGTH, batch_size=batch_size, limit=limit,
        )
        _scan_lm(
            run_scan, src, net, loaded, out=out, checkpoint=checkpoint, data=data, limit=limit, id_column=id_column,
            layers=layers, dim=dim, seed=seed, engine=engine, index=index, overwrite=overwrite, shard_rows=shard_rows,
            batch_size=batch_size, device=dev, token_reduction=token_reduction, quiet=quiet, as_json=as_json, t0=t0,
            neighbor_scores=neighbor_scores, build_index=build_index, cuda_graphs=cuda_graphs,
        )
        return
    # Text labels map to the ids of these names (the model's classes): --class-names, else a trained Hugging Face
    # head's id2label (a new head's names are the checkpoint's, not this head's)
    given_names = _class_names(class_names, None, None if loaded.info.get("new_head") else loaded.model)
    names_from = "--class-names" if class_names is not None else "the model's id2label"
    src = open_data(
        data, format=format, label_column=label_column, id_column=id_column, feature_column=feature_column,
        feature_columns=feature_columns, text_column=text_column, input_shape=shape, tokenizer=loaded.tokenizer,
        split=split, batch_size=batch_size, limit=limit, num_workers=num_workers, max_length=max_length or 128,
        classification=loss is not LossKind.MSE, num_classes=num_classes, labels=not no_labels,
        multilabel=loss is LossKind.BCE, class_names=given_names,
    )
    # Text labels without --class-names are numbered by their sorted names: right only when the data names every
    # class of the model (a subset without one would shift the ids of the rest), so the model must have as many
    sorted_names = src.description.get("class_names") if src.description.get("label_ids") == "sorted names" else None
    scan_classes = num_classes
    if sorted_names is not None:
        if num_classes is not None and num_classes != len(sorted_names):
            raise typer.BadParameter(
                f"the labels are {len(sorted_names)} class names {sorted_names[:10]} but --num-classes is "
                f"{num_classes}; pass --class-names with every class of the model, class 0 first, so each name "
                "gets its class id."
            )
        scan_classes = len(sorted_names)
    # --class-names names the model's classes, class 0 first: as many as the model has, or every name after the
    # first missing class would label another class's samples (integer labels included)
    named = given_names if loss not in (LossKind.MSE, LossKind.BCE) else None
    if named is not None:
        if num_classes is not None and num_classes != len(named):
            raise typer.BadParameter(
                f"{names_from} names {len(named)} classes {named[:10]} but --num-classes is {num_classes}; "
                "pass --class-names with one name per class of the model, class 0 first."
            )
        scan_classes = len(named)
    bars = _RichProgress(quiet or as_json or rank != 0)
    # What defines the data read: part of the scan's configuration, so a rerun with other values is refused.
    data_options = {
        "data": str(Path(data).resolve()) if Path(data).exists() else data, "data_format": src.format.value,
        "split": split, "limit": limit, "label_column": label_column, "id_column": id_column,
        "feature_column": feature_column, "feature_columns": feature_columns, "text_column": text_column,
        "input_shape": list(shape) if shape else None,
    }
    provenance = {**data_options, "checkpoint": str(checkpoint), "checkpoint_kind": loaded.kind,
                  "class_names": _class_names(class_names, src.description.get("class_names"), loaded.model),
                  "new_head": loaded.info.get("new_head", False), "new_head_seed": loaded.info.get("new_head_seed"),
                  "data_hint": src.description.get("fingerprint_hint"), "batch_size": batch_size, "device": str(dev)}
    try:
        with bars.progress:
            result = run_scan(
                net, src, out=out, layers=layers, dim=dim, seed=seed, engine=engine,
                loss_fn=None if loss is LossKind.AUTO else loss.value, num_classes=scan_classes, index=index,
                overwrite=overwrite, progress=bars, total=src.total, shard_rows=shard_rows, provenance=provenance,
                config_extra=data_options, labels=None if no_labels else True, task=task,
                token_reduction=token_reduction, score_config=_score_config(neighbor_scores), build_index=build_index,
                cuda_graphs=cuda_graphs,
            )
    except ClassCountError as exc:
        if named is not None and num_classes is None:
            raise typer.BadParameter(
                f"the model has {exc.model_classes} classes but {names_from} names {len(named)} {named[:10]}; "
                "pass --class-names with one name per class of the model, class 0 first."
            ) from None
        if sorted_names is None or num_classes is not None:
            raise
        raise typer.BadParameter(
            f"the model has {exc.model_classes} classes but the labels hold {len(sorted_names)} class names "
            f"{sorted_names[:10]}, which would be numbered in sorted order whatever the model's classes are; pass "
            "--class-names with every class of the model, class 0 first."
        ) from None
    if rank != 0:  # the other ranks of a distributed scan: rank 0 reports the scan they made together
        return
    manifest = result.manifest()
    summary = {
        "out": str(out), "samples": int(len(manifest)), "seconds": round(time.perf_counter() - t0, 3),
        "manifest": str(result.manifest_path), "engine_plan": result.engine_metadata.get("plan"),
        "hard": int(manifest["is_hard"].sum()) if "is_hard" in manifest else None,
        "accuracy": float(manifest["correct"].mean()) if "correct" in manifest and manifest["correct"].notna().any() else None,
    }
    if as_json:
        emit_json(summary)
    elif not quiet:
        stderr.print(f"scanned {summary['samples']} samples in {summary['seconds']:.1f}s -> {out}")
        print_table(manifest, top=10, title="hardest samples")
    del torch


def _scan_lm(
    run_scan: Any, src: Any, net: Any, loaded: Any, *, out: Path, checkpoint: Path, data: str, limit: int | None,
    id_column: str | None, layers: str | None, dim: int, seed: int, engine: Engine, index: IndexKind, overwrite: bool,
    shard_rows: int, batch_size: int, device: Any, token_reduction: TokenReduction, quiet: bool, as_json: bool,
    t0: float, neighbor_scores: bool, build_index: bool, cuda_graphs: bool,
) -> None:
    """The causal-LM branch of ``scan_command``: scan ``src`` (``open_text``) and print the summary."""
    max_length = src.max_length
    columns = {k: src.description.get(k) for k in ("text_column", "prompt_column", "completion_column", "messages_column")}
    data_options = {
        "data": str(Path(data).resolve()) if Path(data).exists() else data, "data_format": src.format.value,
        "limit": limit, "id_column": id_column, "task": TaskKind.CAUSAL_LM.value, **columns, "max_length": max_length,
    }
    provenance = {**data_options, "checkpoint": str(checkpoint), "checkpoint_kind": loaded.kind,
                  "batch_size": batch_size, "device": str(device)}
    from ..scan.distributed import rank_and_world

    rank, _ = rank_and_world()  # under torchrun: rank 0 alone shows progress and reports
    bars = _RichProgress(quiet or as_json or rank != 0)
    with bars.progress:
        result = run_scan(
            net, src, out=out, layers=layers, dim=dim, seed=seed, engine=engine, index=index, overwrite=overwrite,
            progress=bars, total=src.total, shard_rows=shard_rows, provenance=provenance, config_extra=data_options,
            task=TaskKind.CAUSAL_LM, token_reduction=token_reduction, tokenizer=loaded.tokenizer,
            score_config=_score_config(neighbor_scores), build_index=build_index, cuda_graphs=cuda_graphs,
        )
    if rank != 0:
        return
    manifest = result.manifest()
    report = {**src.report(), **result.info.get("data", {})}  # scan.json's: over every rank's rows
    summary = {
        "out": str(out), "samples": int(len(manifest)), "seconds": round(time.perf_counter() - t0, 3),
        "manifest": str(result.manifest_path), "tokens": str(Path(out) / "tokens.parquet"),
        "engine_plan": result.engine_metadata.get("plan"), "task": TaskKind.CAUSAL_LM.value,
        "hard": int(manifest["is_hard"].sum()), "truncated": report["truncated"], "max_length": max_length,
        "target_tokens": int(manifest["n_target_tokens"].sum()),
    }
    if as_json:
        emit_json(summary)
    elif not quiet:
        stderr.print(f"scanned {summary['samples']} samples ({summary['target_tokens']} target tokens) in "
                     f"{summary['seconds']:.1f}s -> {out}")
        if report["truncated"]:
            stderr.print(f"{report['truncated']} sample(s) were cut to --max-length {max_length} tokens")
        print_table(manifest, top=10, title="hardest samples")


def _score_config(neighbor_scores: bool) -> Any:
    """The scan's ``ScoreConfig``: the defaults, with ``--neighbor-scores`` forcing the neighbour scores on."""
    from ..score import ScoreConfig

    return ScoreConfig(neighbor_scores=True) if neighbor_scores else ScoreConfig()


def _class_names(option: str | None, from_data: list[str] | None, model: Any) -> list[str] | None:
    """Names of the classes, class 0 first: --class-names, else the data's (text labels, ClassLabel), else a
    Hugging Face config's id2label when it holds real names (not the LABEL_0... placeholders)."""
    if option is not None:
        names = [n.strip() for n in option.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise typer.BadParameter(f"--class-names {option!r} must be distinct, non-empty, comma-separated names.")
        return names
    if from_data:
        return list(from_data)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if isinstance(id2label, dict) and id2label:
        names = [str(id2label[i]) for i in sorted(id2label)]
        # One name (a single-logit head's) numbers no classifier's classes: the head's two are 0 and 1
        if len(names) > 1 and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return names
    return None


def _device(name: str) -> Any:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise typer.BadParameter(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {name!r} asked for CUDA but no CUDA device is available; use --device cpu.")
    return dev
