"""``OnlineMiner``: the training-loop API, a façade over the per-step gradient pass (:mod:`.gradients`), the
weighting (:mod:`.weighting`), the per-sample dynamics (:mod:`.dynamics`) and the manifest (:mod:`.manifest`).
The package docstring (:mod:`hardmine.online`) describes what it computes and what it costs.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._io import model_fingerprint
from ..batches import (
    DeferredChecks,
    call_model,
    check_labels,
    check_lm_labels,
    check_target,
    clamped_labels,
    infer_task,
    input_leaves,
    is_causal_lm_batch,
    model_output_tensor,
    sample_id_list,
    sample_id_tensor,
)
from ..checks import as_bool, as_module, positive_int, projection_kind
from ..enums import LossKind, ProjectionKind, Strategy, TaskKind, parse_choice
from ..factored.layout import ProjectionLayout
from ..losses import IGNORE_INDEX, LossFn, causal_lm_per_sample, class_count, loss_name, resolve_loss
from ..manifest import write_manifest
from ..params import check_one_device, select_parameters
from ..score import DEFAULT_BOOST, DEFAULT_CAP, DEFAULT_TEMPERATURE, DEFAULT_TOP
from .device_step import DeviceStep
from .dynamics import COL, RECORD_EVERY, SampleDynamics, host_batch, stats_on_host
from .gradients import StepGradients
from .manifest import build_manifest
from .weighting import Directions, WeightingConfig, training_weights

__all__ = ["STATE_FORMAT", "OnlineMiner", "OnlineStats"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "hardmine-online-state"
_STATE_VERSION = 1


@dataclass
class OnlineStats:
    """What ``observe`` returns for one batch. Everything but ``loss`` and ``output`` is detached."""

    loss: torch.Tensor  # (B,) per-sample loss, attached to the graph
    weights: torch.Tensor  # (B,) detached training weights, mean 1 (all 1 during warm-up), loss dtype
    output: torch.Tensor  # (B, ...) model output (logits), attached
    z: torch.Tensor  # (B, out_dim) float32 projected per-sample gradients
    grad_norm: torch.Tensor  # (B,) exact L2 norm of the unprojected per-sample gradient of the selection
    agreement: torch.Tensor  # (B,) the agreement that set the weight (class, or global for regression)
    global_agreement: torch.Tensor  # (B,) cos(u, global EMA direction)
    confidence: torch.Tensor | None  # (B,) p[label]; None for regression
    margin: torch.Tensor | None  # (B,) p[label] - max other p (as the offline manifest); None for regression
    # (B,) logit[label] - max other logit (AUM's margin); None for regression
    logit_margin: torch.Tensor | None
    correct: torch.Tensor | None  # (B,) bool; None for regression
    step: int  # 1-based observation count of the miner
    warmup: bool  # True when the weights were forced to 1
    path: str  # "analytic" or "autograd" (see the package docstring)

    def weighted_loss(self) -> torch.Tensor:
        """``(loss * weights).mean()``, the usual training objective."""
        return (self.loss * self.weights).mean()


class OnlineMiner:
    """Per-sample weights for the current batch and a manifest accumulated across epochs, from one forward.

    Args:
        model: the ``nn.Module`` being trained. Nothing is attached to it (see the package docstring).
        layers: names/globs of modules or parameters whose per-sample gradients are projected
            (``"classifier"``, ``"fc2"``, ``"layers.*.mlp.*"``); ``None`` = every trainable parameter. Every
            selected parameter must belong to a module with a factored layer rule (``nn.Linear``,
            ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, RMSNorm-style norms, ``transformers``'
            ``Conv1D``: every parameter of GPT-2, BERT or Llama models); select the output layer alone for the
            analytic path. Modules called on an input broadcast over the batch (position embeddings) are
            expanded per sample (see :meth:`capture`).
        num_classes: number of classes (classification). ``None``: taken from the output width of the first
            batch. Ignored for regression.
        dim: projection size per weight matrix (``(a, b) = kron_factors(dim)``), as in ``GradientExtractor``.
        seed: projection seed (same matrices as an offline scan with the same layers/dim/seed).
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``"causal_lm"``, ``None``/``"auto"`` (by target dtype; a
            ``(B, T, V)`` output with ``(B, T)`` integer labels is a causal LM) or a callable
            ``loss_fn(output, target) -> (B,)`` that does not mix samples (then the autograd path is used).
            Causal LM: the per-sample loss is the mean next-token NLL over the sample's target tokens (labels
            shifted as Hugging Face models do, ``-100`` masked: padding, prompt tokens;
            ``hardmine.losses.causal_lm_per_sample``), so the weights multiply those masked token losses.
        projection: ``"rademacher"`` or ``"gaussian"`` projection entries (as ``hardmine.scan(projection=)``).
        weighting: a :class:`WeightingConfig` (or a dict of its fields).
        keep_gradients: also keep each sample's last projected gradient (``N x out_dim`` float32), returned
            by :meth:`gradients`. Off by default: the miner's memory stays ``O(N)`` scalars.
        cuda_graphs: on a CUDA device, replay the step's own work after the user's forward (projections,
            statistics, weights, directions) as a CUDA graph (:mod:`hardmine.online.device_step`): the same
            values, with far less host time per step. It applies past the warm-up, after two steps of one
            batch shape; anything a graph cannot hold, or a replay that differs from the eager step, switches it
            off with a warning (:meth:`cuda_graph_state` says what happened). Off by default.
        kind: the old name of ``projection``; accepted for one release with a ``DeprecationWarning``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Sequence[str] | None = None,
        num_classes: int | None = None,
        dim: int = 256,
        seed: int = 0,
        loss_fn: str | LossFn | None = None,
        projection: ProjectionKind | str | None = None,
        weighting: WeightingConfig | Mapping[str, Any] | None = None,
        keep_gradients: bool = False,
        kind: ProjectionKind | str | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        as_module(model)
        as_bool(cuda_graphs, "cuda_graphs")
        num_classes = positive_int(num_classes, "num_classes", allow_none=True)
        keep = as_bool(keep_gradients, "keep_gradients")
        if loss_fn is not None and not callable(loss_fn):
            resolve_loss(loss_fn, torch.zeros(1, dtype=torch.long))  # reject unknown loss names now
        self.model = model
        self.layers = layers
        self.loss_fn = loss_fn
        self.weighting = _weighting_config(weighting)
        self.param_names = select_parameters(model, layers)
        check_one_device(model, self.param_names, "OnlineMiner")
        projection = projection_kind(projection, kind, "OnlineMiner")
        self.layout = ProjectionLayout(model, self.param_names, dim=dim, seed=seed, kind=projection)
        self._grads = StepGradients(model, self.param_names, self.layout)
        self._device_step = DeviceStep(self._grads, cuda_graphs)
        self._num_classes: int | None = num_classes
        self._task: TaskKind | None = None
        self._step = 0
        self._closed = False
        self._dirs: Directions | None = None  # created by the first observation, with the class count
        self._dyn = SampleDynamics(self.layout.out_dim if keep else None)
        self._checks = DeferredChecks()  # label checks of later steps, read when the device is done
        logger.info(
            "OnlineMiner: layers %s, out_dim %d, weighting %s",
            self.param_names,
            self.out_dim,
            self.weighting.to_dict(),
        )

    # ------------------------------------------------------------------------------------ properties
    @property
    def out_dim(self) -> int:
        return self.layout.out_dim

    @property
    def step(self) -> int:
        """Observations so far."""
        return self._step

    @property
    def n_samples(self) -> int:
        """Distinct sample ids observed so far."""
        self._settle()
        return self._dyn.n

    def _settle(self) -> None:
        """Wait for the steps still on the device: their label checks and per-sample dynamics."""
        self._checks.poll(wait=True)
        self._dyn.poll(wait=True)

    def cuda_graph_state(self) -> dict[str, Any]:
        """What ``cuda_graphs`` did: asked for, graphs captured and replayed, and why they are off (if so)."""
        return self._device_step.state()

    @property
    def task(self) -> TaskKind | None:
        return self._task

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    @property
    def _protect(self) -> set[str]:
        """Modules whose output the model modifies in place (learnt by the first observation)."""
        return self._grads.protect

    def __repr__(self) -> str:
        return (
            f"OnlineMiner(layers={self.param_names}, out_dim={self.out_dim}, step={self._step}, "
            f"samples={self.n_samples})"
        )

    def __enter__(self) -> OnlineMiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop references to captured activations; the miner refuses further observations. Idempotent."""
        self._grads.drop()
        self._dyn.poll(wait=True)  # the last steps' dynamics are still recorded
        self._closed = True

    # --------------------------------------------------------------------------------------- capture
    @contextmanager
    def capture(self, batch_size: int | None = None) -> Iterator[None]:
        """Hooks on the selected modules for the forward run inside the block; removed on exit (``finally``).

        Use it when a framework runs the forward: ``with miner.capture(): out = model(x)`` then
        ``miner.observe_output(out, y, ids)``. ``batch_size``: the batch's size, needed by modules called on an
        input broadcast over the batch (position embeddings on ``(1, T)`` position ids); ``None`` reads it
        from the first tensor the model's forward receives whose first dimension is not 1 (the first tensor
        where all are). :meth:`observe` passes the target's rows.
        """
        self._check_open()
        if batch_size is not None:
            batch_size = positive_int(batch_size, "batch_size")
        with self._grads.capture(batch_size):
            yield

    def observe(self, inputs: Any, target: torch.Tensor, ids: Any = None) -> OnlineStats:
        """Run the model once on ``inputs`` and return the batch's :class:`OnlineStats`.

        Args:
            inputs: a tensor, a tuple of tensors (positional arguments) or a mapping (keyword arguments).
            target: ``(B,)`` integer class ids (classification) or float targets (regression).
            ids: one sample id per row (ints or strings; e.g. dataset indices). ``None``: no per-sample
                dynamics are recorded (weights only).
        """
        self._check_open()
        # The batch's size from the target (one row per sample), not from an input: a model's first input may be
        # broadcast over the batch (a (1, T) position_ids ahead of input_ids)
        if isinstance(target, torch.Tensor) and target.ndim:
            b = int(target.shape[0])
        else:  # (check_target refuses it once the forward has run)
            leaves = input_leaves(inputs)
            b = int(leaves[0][1].shape[0]) if leaves and leaves[0][1].ndim else 0
        with self.capture(b or None):
            raw = call_model(self.model, inputs)
        return self.observe_output(raw, target, ids)

    def observe_output(self, output: Any, target: torch.Tensor, ids: Any = None) -> OnlineStats:
        """Stats for a forward already run inside ``with miner.capture():``. ``output`` is the model's return
        value (a tensor, an object/mapping with ``logits``, or a tuple whose first element is the output)."""
        self._check_open()
        self._checks.poll()  # earlier steps whose device work has finished (on the CPU: all of them)
        rec = self._grads.take()
        out = model_output_tensor(output)
        fn, kind, task, b, flags, safe, labels_deferred = self._validate(out, target)
        id_list: tuple[Any, str] | None = None
        if isinstance(ids, torch.Tensor) and not stats_on_host(out.device):
            # Ids riding with the batch on the device (a Trainer moves every column there): checked by shape,
            # read once copied with the dynamics, so no host sync per step.
            id_list = (sample_id_tensor(ids, b), "int")
        elif ids is not None:
            id_list = sample_id_list(ids, b)
        if id_list is not None:
            self._dyn.check_kind(id_list[1])  # before any state changes: a batch refused changes nothing
        if flags:
            # Read at once when it costs nothing (the CPU), so a bad batch changes no state; on a GPU once the
            # device has got there, and a later observe raises (meanwhile the loss used ignored labels).
            self._checks.submit(flags, functools.partial(check_lm_labels, target, int(out.shape[2])))
            self._checks.poll()
        is_class = task is TaskKind.CLASSIFICATION
        labels = safe if is_class else None
        warm = self._step + 1 <= self.weighting.warmup_steps or self.weighting.strength == 0
        dev = out.device
        prep = self._grads.prepare(rec, out, safe, fn, kind, b)
        # The miner's state changes only once the step's work has succeeded: a batch refused (or a step that
        # fails, e.g. out of memory, and is skipped by the training loop) changes nothing.
        num_classes = self._num_classes
        if is_class and num_classes is None:
            num_classes = class_count(out)  # a single logit: 2 classes
        dirs = self._dirs or Directions.new(num_classes if is_class else None, self.out_dim, dev)
        if stats_on_host(dev):
            # The CPU: one copy that costs nothing, NumPy for the statistics, weights and dynamics.
            self._device_step.on_host(dev)
            z, sq = self._grads.project(prep.inputs, prep.received, out.detach(), safe, kind, b)
            # A causal LM has no per-sample output statistics here (its logits are (B, T, V)): the host copy
            # gets one NaN column instead of the logits, so pred and label stay NaN as for a multi-output
            # regression.
            stats_out = out.new_full((b, 1), float("nan")) if task is TaskKind.CAUSAL_LM else out
            z_norm, along = dirs.along(z, labels)  # against the directions *before* this update
            args = (stats_out, safe, prep.loss, sq, z_norm, along)
            kw = {"is_class": is_class, "gathered": dirs.gathers, "by_class": self.weighting.by_class}
            host = host_batch(*args, **kw)
            w_h = training_weights(host.last[:, COL["agreement"]], self.weighting, warm)  # (B,)
            self._commit(task, num_classes, dirs)
            host.last[:, COL["last_weight"]] = w_h
            host.last[:, COL["last_step"]] = self._step
            lab = host.last[:, COL["label"]].astype(np.int64) if is_class else None
            assert host.inv is not None
            dirs.update_host(z, labels, lab, host.inv, self.weighting.momentum)
            if id_list is not None:
                zh = z.detach().numpy() if self._dyn.grads is not None else None
                self._dyn.poll(wait=True)  # steps queued on a GPU before a move to the CPU come first
                self._dyn.record(id_list, host, zh, task)

            def col(name: str) -> torch.Tensor:
                return torch.from_numpy(host.last[:, COL[name]].copy()).to(dev)

            w = torch.from_numpy(w_h).to(dev, prep.loss.dtype)
            grad_norm = sq.clamp_min(0).sqrt()
            logit_margin = torch.from_numpy(host.logit_margin).to(dev)
            correct = torch.from_numpy(host.correct).to(dev) if host.correct is not None else None
        else:
            # A GPU: everything stays on the device (no host sync per step): the statistics, the weights and
            # the direction update (DeviceStep: eagerly, or replayed from a CUDA graph); the per-sample dynamics
            # are copied to the host without blocking and recorded once they have landed (a later observe, or
            # any method that reads them).
            # A classifier's labels as given go in on every step (one graph whether the host checked them or
            # not): the step flags any outside the classes, read as the flags above are where deferred
            # (meanwhile the loss and the step used them clamped)
            given = target if is_class else None
            values = self._device_step(prep, out, safe, kind, task, dirs, self.weighting, warm, given)
            if labels_deferred:
                assert values.label_flag is not None  # a classifier's step has one
                self._checks.submit([values.label_flag], functools.partial(check_labels, target, class_count(out)))
                self._checks.poll()
            self._commit(task, num_classes, dirs)
            dirs.dirs, dirs.seen = values.dirs, values.seen
            if id_list is not None:
                self._dyn.submit(id_list, values.packed, values.z, task, self._step)
                self._dyn.poll(least=RECORD_EVERY)  # several steps' copies recorded together

            shown = values.columns()  # (B,) each: columns of a tensor of its own, not what goes to the host

            def col(name: str) -> torch.Tensor:
                return shown[name]

            z, w, grad_norm = values.z, values.weights, values.grad_norm
            logit_margin, correct = (shown["logit_margin"] if is_class else None), values.correct

        return OnlineStats(
            loss=prep.loss,
            weights=w,
            output=out,
            z=z,
            grad_norm=grad_norm,
            agreement=col("agreement"),
            global_agreement=col("global_agreement"),
            confidence=col("confidence") if is_class else None,
            margin=col("margin") if is_class else None,
            logit_margin=logit_margin if is_class else None,
            correct=correct,
            step=self._step,
            warmup=warm,
            path=prep.path,
        )

    def _commit(self, task: TaskKind, num_classes: int | None, dirs: Directions) -> None:
        """The miner's state after a step whose work has succeeded (one more observation)."""
        self._task, self._num_classes, self._dirs = task, num_classes, dirs
        self._step += 1

    # ----------------------------------------------------------------------------------- validation
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this OnlineMiner is closed; create a new one (or load_state_dict into one).")

    def _validate(
        self, out: torch.Tensor, target: Any
    ) -> tuple[LossFn, LossKind | None, TaskKind, int, list[torch.Tensor], torch.Tensor, bool]:
        """``(loss, kind, task, batch size, device flags, target to compute the loss on, labels deferred)``. The
        first observation (and every one on the CPU) checks label values on the host; later ones on a GPU on
        the device, with the labels clamped into range (a classifier: ``labels deferred``, the step's
        ``DeviceStep`` computes their flag, ``batches.label_flag``) or ignored (a causal LM: its flag in
        ``device flags``), so nothing fails on the device before the flag is read."""
        check_target(target)
        flags: list[torch.Tensor] = []
        if not torch.is_floating_point(out):
            raise ValueError(
                f"the model output has dtype {out.dtype}; return logits/scores, not predicted ids."
            )
        if out.ndim == 0 or target.ndim == 0:
            raise ValueError("the output and the target need a leading batch dimension.")
        b = int(out.shape[0])
        if b == 0 or int(target.shape[0]) != b:
            raise ValueError(
                f"the output has {b} rows but the target {int(target.shape[0])}; they must match (> 0)."
            )
        fn, kind = self._resolve_loss(out, target)
        task = infer_task(kind, target, out)
        if task is TaskKind.MULTILABEL:
            raise ValueError(
                "the online miner does not mine multi-label (bce) models yet; scan them offline with "
                "hardmine.scan(..., loss_fn='bce') (or hardmine scan --loss bce)."
            )
        if self._task is not None and task is not self._task:
            raise ValueError(
                f"this miner has seen {self._task.value} batches; this batch looks like {task.value} (target "
                f"dtype {target.dtype}). Use one miner per task."
            )
        if task is TaskKind.CAUSAL_LM:
            if not is_causal_lm_batch(out, target):
                raise ValueError(
                    f"a causal LM needs (B, T, vocab) logits and (B, T) integer token labels, got output shape "
                    f"{tuple(out.shape)} and labels {target.dtype} of shape {tuple(target.shape)}."
                )
            vocab = int(out.shape[2])
            if self._step == 0 or stats_on_host(out.device):  # free on the host
                check_lm_labels(target, vocab)
            else:  # no device sync: out-of-range ids are ignored by the loss until the flag is read
                outside = (target != IGNORE_INDEX) & ((target < 0) | (target >= vocab))  # (B, T)
                flags.append(outside.any())
                return fn, kind, task, b, flags, target.masked_fill(outside, IGNORE_INDEX), False
        elif task is TaskKind.CLASSIFICATION:
            if out.ndim == 3 and target.ndim == 2 and not torch.is_floating_point(target):
                raise ValueError(
                    f"a causal LM needs (B, T, vocab) logits and (B, T) integer token labels of the same B and "
                    f"T, got output shape {tuple(out.shape)} and labels of shape {tuple(target.shape)}; pass "
                    "the logits of every position (labels are shifted inside the loss)."
                )
            if torch.is_floating_point(target) or target.dtype == torch.bool or target.ndim != 1:
                raise ValueError(
                    f"classification targets must be 1-D integer class ids, got {target.dtype} of shape "
                    f"{tuple(target.shape)}; pass target.long(), or loss_fn='mse' for regression."
                )
            if out.ndim not in (1, 2):
                raise ValueError(
                    f"classification needs (B, num_classes) logits, got output shape {tuple(out.shape)}."
                )
            c = class_count(out)  # a single logit is the binary model [0, z]
            if self._num_classes is not None and c != self._num_classes:
                width = 1 if out.ndim == 1 else int(out.shape[1])
                binary = " (a single logit: a binary model, 2 classes)" if width == 1 else ""
                raise ValueError(
                    f"the model returned {width} logit(s) per sample{binary} but num_classes={self._num_classes}."
                )
            if self._step == 0 or stats_on_host(out.device):  # free on the host
                check_labels(target, c)
            else:  # the loss on labels clamped into range; DeviceStep says whether any was outside
                return fn, kind, task, b, flags, clamped_labels(target, c), True
        elif kind is LossKind.MSE:
            if not torch.is_floating_point(target):
                raise ValueError(
                    f"regression (mse) targets must be floating point, got dtype {target.dtype}."
                )
            if target.numel() != out.numel():
                raise ValueError(
                    f"mse target shape {tuple(target.shape)} does not match the output shape "
                    f"{tuple(out.shape)}."
                )
        return fn, kind, task, b, flags, target, False

    def _resolve_loss(self, out: torch.Tensor, target: torch.Tensor) -> tuple[LossFn, LossKind | None]:
        """``resolve_loss``, plus: with the default loss, ``(B, T, V)`` logits and ``(B, T)`` integer labels are
        a causal LM (mean next-token NLL over the target tokens, ``hardmine.losses.causal_lm_per_sample``);
        passing that function itself as ``loss_fn`` means the same."""
        auto = self.loss_fn is None or (
            isinstance(self.loss_fn, (str, LossKind))
            and parse_choice(LossKind, self.loss_fn, "loss") is LossKind.AUTO
        )
        if (auto and is_causal_lm_batch(out, target)) or self.loss_fn is causal_lm_per_sample:
            return causal_lm_per_sample, LossKind.CAUSAL_LM
        return resolve_loss(self.loss_fn, target)

    # ------------------------------------------------------------------------------------ manifest
    def manifest(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        strategy: Strategy | str = Strategy.TOP_K,
        top: float = DEFAULT_TOP,
        boost: float = DEFAULT_BOOST,
        temperature: float = DEFAULT_TEMPERATURE,
        cap: float | None = DEFAULT_CAP,
    ) -> pd.DataFrame:
        """One row per observed sample id (sorted by id): offline manifest columns + training dynamics.

        Args:
            weights: hardness weight per column of ``ONLINE_SCORE_TABLE`` with a direction; default
                ``DEFAULT_ONLINE_WEIGHTS`` (classification) / ``DEFAULT_ONLINE_WEIGHTS_REGRESSION``.
            strategy, top, boost, temperature, cap: the export that fills ``is_hard`` and ``weight``
                (``hardmine.manifest.compute_weights``). ``top-k`` by default here, unlike the offline scan's
                per-class: it is what the quality benchmark measured for "online weighting + MinerSampler
                refreshed per epoch", the best worst-sub-class row on clean labels.

        ``df.attrs["hardmine"]`` holds the metadata :meth:`write_manifest` embeds.
        """
        self._settle()
        return build_manifest(
            self._dyn,
            self._task,
            self._describe(),
            weights=weights,
            strategy=strategy,
            top=top,
            boost=boost,
            temperature=temperature,
            cap=cap,
        )

    def _describe(self) -> dict[str, Any]:
        """The miner's part of the manifest metadata."""
        layers = self.layers
        return {
            "task": self._task.value if self._task else None,
            "num_classes": self._num_classes,
            "steps": self._step,
            "model_fingerprint": model_fingerprint(self.model),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "layers": list(self.param_names),
            "layers_requested": layers if layers is None or isinstance(layers, str) else list(layers),
            "projection": {
                "dim": self.layout.dim,
                "out_dim": self.out_dim,
                "seed": self.layout.seed,
                "kind": self.layout.kind.value,
                "factors": [self.layout.a, self.layout.b],
            },
            "layout": self.layout.describe(),
            # causal_lm_per_sample passed as loss_fn is the built-in causal-LM loss (see _resolve_loss): its name
            "loss": LossKind.CAUSAL_LM.value if self.loss_fn is causal_lm_per_sample
            else loss_name(self.loss_fn, self._task.value if self._task else None),
            "weighting": self.weighting.to_dict(),
        }

    def write_manifest(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write :meth:`manifest` (same keyword arguments) to ``path`` atomically as a hardmine manifest."""
        df = self.manifest(**kwargs)
        return write_manifest(df, path, df.attrs["hardmine"])

    def gradients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sample_ids, Z (N, out_dim) float32)``: each sample's last projected gradient, in manifest order.
        Needs ``keep_gradients=True``."""
        self._settle()
        if self._dyn.grads is None:
            raise ValueError("gradients are not kept; create the miner with keep_gradients=True.")
        ids = self._dyn.id_array()
        order = np.argsort(ids, kind="stable")
        return ids[order], self._dyn.grads[: self._dyn.n][order]

    # ---------------------------------------------------------------------------------------- state
    def _config(self) -> dict[str, Any]:
        return {
            "params": list(self.param_names),
            "dim": self.layout.dim,
            "seed": self.layout.seed,
            "kind": self.layout.kind.value,  # the projection kind (key kept: saved states use it)
            "loss": _loss_name(self.loss_fn),
            "keep_gradients": self._dyn.grads is not None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: directions, step, per-sample dynamics (CPU tensors and plain values).
        Each part writes its own keys (one flat dict, the format of every hardmine release so far)."""
        self._settle()
        return {
            "format": STATE_FORMAT,
            "version": _STATE_VERSION,
            "config": self._config(),
            "weighting": self.weighting.to_dict(),
            "task": self._task.value if self._task else None,
            "num_classes": self._num_classes,
            "step": self._step,
            **self._grads.state_dict(),
            **(self._dirs.state_dict() if self._dirs is not None else {"dirs": None, "dirs_seen": None}),
            **self._dyn.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a miner built with the same layers, dim, seed, projection and
        loss."""
        self._check_open()
        self._settle()
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a hardmine OnlineMiner state (missing format 'hardmine-online-state').")
        if int(state.get("version", 0)) > _STATE_VERSION:
            raise ValueError(
                f"the state has version {state.get('version')}; this hardmine reads version {_STATE_VERSION} "
                "or older. Upgrade hardmine."
            )
        mine, theirs = self._config(), dict(state["config"])
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            text = "; ".join(f"{k}: state {a!r} vs miner {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the state was saved by a differently configured miner ({text}); build it the same way."
            )
        self.weighting = WeightingConfig.from_dict(state["weighting"])
        self._task = TaskKind(state["task"]) if state["task"] is not None else None
        self._num_classes = state["num_classes"]
        self._step = int(state["step"])
        self._grads.load_state(state)
        self._dirs = Directions.from_state(state)
        self._dyn = SampleDynamics.from_state(state, self._dyn.keep_dim)


def _weighting_config(weighting: WeightingConfig | Mapping[str, Any] | None) -> WeightingConfig:
    if weighting is None:
        return WeightingConfig()
    if isinstance(weighting, Mapping):
        return WeightingConfig.from_dict(weighting)
    if not isinstance(weighting, WeightingConfig):
        raise ValueError(
            "weighting must be a hardmine.WeightingConfig or a dict of its fields, got "
            f"{type(weighting).__name__}."
        )
    return weighting


def _loss_name(loss_fn: Any) -> str:
    if loss_fn is None:
        return LossKind.AUTO.value
    if isinstance(loss_fn, (str, LossKind)):
        return parse_choice(LossKind, loss_fn, "loss").value
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    return f"callable:{getattr(loss_fn, '__module__', '?')}.{name}"
