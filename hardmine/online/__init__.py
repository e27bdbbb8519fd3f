"""Training-loop API: per-sample gradient weighting and hard-example mining inside your own loop.

>>> miner = hardmine.OnlineMiner(model, layers="classifier", num_classes=10, dim=256, seed=0)
>>> for x, y, ids in loader:
...     stats = miner.observe(x, y, ids)              # the step's only forward
...     loss = (stats.loss * stats.weights).mean()    # == stats.weighted_loss()
...     loss.backward(); opt.step(); opt.zero_grad()
>>> miner.write_manifest("online_manifest.parquet")   # or miner.manifest() -> DataFrame
>>> miner.close()

**One forward per step.** ``observe`` runs the model once with forward hooks on the selected modules (removed
before it returns) that keep a reference to each call's input ``x`` and output (a selected
``nn.MultiheadAttention`` is the exception: its hook computes the attention once more with its projections in
the graph, and the model continues from that output; see :mod:`hardmine.factored.attention`). ``stats.loss`` is the
per-sample loss *still attached to the graph*, so the user's backward is the only full backward. Frameworks
that run the forward themselves use ``with miner.capture(): out = model(x)`` then
``miner.observe_output(out, y, ids)`` (the Lightning and Hugging Face integrations do exactly that).

**Projected per-sample gradients** use the same seeded layout as the offline engines
(:class:`hardmine.factored.ProjectionLayout`: ``P_out ⊗ P_in`` per weight matrix keyed ``"{param}:out"`` /
``"{param}:in"``, dense seeded blocks for biases), so online vectors are comparable with an offline scan of
the same model, layers, ``dim`` and ``seed``. Two paths, chosen per step automatically (``stats.path``):

* ``"analytic"`` -- every selected module is the model's output layer (e.g. the final ``nn.Linear``), its
  output is returned unchanged and the loss is built in. The per-sample gradient at the logits is known in
  closed form -- cross-entropy: ``delta_b = softmax(logits_b) - onehot(y_b)``; MSE (mean over ``d`` outputs):
  ``delta_b = 2 (out_b - y_b) / d`` -- so the layer's per-sample gradient ``delta_b ⊗ h_b`` (``h_b`` = the
  captured input) is projected as ``(P_out^T delta_b) ⊗ (P_in^T h_b)`` with **no extra backward**.
  Extra cost per step: ``O(B·(C·a + d_in·b + a·b))`` for the projection plus the weighting below.
* ``"autograd"`` -- anything else (several layers, a layer inside the network, a custom loss):
  ``torch.autograd.grad(loss.sum(), [selected layers' outputs], retain_graph=True)`` returns every sample's
  gradient at those outputs (row ``b`` belongs to sample ``b`` alone). Only gradients with respect to module
  *outputs* are requested, so no weight gradient is formed and ``param.grad`` is never touched. This costs
  **one extra backward through the part of the graph between the loss and the earliest selected layer**
  (without weight-gradient matmuls), plus the factored per-layer projections of
  :mod:`hardmine.factored` (cheap for ``Linear``; ``Conv2d`` unfolds patches chunk by chunk).

Both paths hand the output gradients to :func:`hardmine.factored.capture.apply_rules`, the one rule
application of every factored pass (``GradientExtractor`` uses it too), so the vectors are the offline ones.
Both paths then cost, per step: one ``(B, D) @ (D, R)`` matmul for the agreement (``D`` = ``out_dim``,
``R`` = classes + 1; ``R`` replaced by 2 above 64 rows), ``O(B * C)`` work for the output statistics and an
``O(B log B)`` exact solve of the weights (``O(B)`` when the configuration lets no weight reach a bound, as the
defaults do: :func:`.weighting.never_clipped`), one ``(R, B) @ (B, D)`` matmul (or an ``index_add`` for many
classes) for the EMA update and ``O(B)`` NumPy updates of the dynamics. On the CPU the statistics and
weights are NumPy on the host (:func:`.dynamics.host_batch`); on a GPU they are tensor operations on the
device (:func:`.dynamics.device_batch`, with no host synchronisation after the first step) and the dynamics
get one non-blocking copy of at most ``B * (L + 1)`` numbers (the columns the task has) to pinned host memory,
recorded once it has landed (a later step, or whichever method reads them). On a GPU that device part (the
projections onwards) is one pure function of the step's tensors (:mod:`.device_step`), which
``OnlineMiner(cuda_graphs=True)`` replays from a CUDA graph: the host then issues one copy per tensor the graph
reads (each selected module's input, the gradients at their outputs on the autograd path, the logits, labels,
losses and directions), one launch and one copy per result, instead of about a hundred kernels. No per-sample
gradient is ever formed. Measured overhead vs a plain training step (MLP and CNN, batch 256):
``scripts/bench_callbacks.py``.

**Causal LMs.** ``(B, T, V)`` logits with ``(B, T)`` integer labels (default loss) are a causal LM: the
per-sample loss is the mean next-token NLL over the target tokens (``hardmine.losses.causal_lm_per_sample``:
shifted as Hugging Face models do, labels ``-100`` masked), always on the autograd path. Modules called on an
input broadcast over the batch (position embeddings on ``(1, T)``) are expanded per sample inside the hooks
(the batch size from ``capture(batch_size=)`` or the model's forward), as in the offline engine; the first step
with such a call checks the rows are used sample by sample (``broadcast_problems``).

**Weighting** (:mod:`.weighting`): a sample whose projected gradient disagrees with the moving average of
its class's mean unit gradient gets a larger weight, normalised to mean 1 (GradTail-style; formula there).
**Training dynamics** per sample id (:mod:`.dynamics`): Dataset Cartography, forgetting events, AUM and the
last-seen values of the offline manifest's scores. **Manifest** (:mod:`.manifest`): one row per sample id
with the offline manifest's columns, so ``hardmine.ManifestSampler`` and ``export_manifest`` work on it.

The package: :mod:`.miner` (``OnlineMiner``, a façade over the parts below), :mod:`.gradients` (the
per-step factored pass), :mod:`.device_step` (the GPU path's device part, eager or from CUDA graphs),
:mod:`.weighting`, :mod:`.dynamics`, :mod:`.manifest`; ``MinerSampler`` lives in
:mod:`hardmine.sampler` and is re-exported here.

**Restarts.** :meth:`OnlineMiner.state_dict` / :meth:`OnlineMiner.load_state_dict` hold everything above
(tensors, numbers, strings and lists only: ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it).

**Distributed training.** ``observe`` calls the model it was given; under ``DistributedDataParallel`` run
the wrapped model's forward yourself inside ``with miner.capture():`` (hooks on the inner model's modules
fire) and call ``observe_output``, so DDP's gradient synchronisation stays in charge. Each rank records the
samples it sees.

**Hygiene.** Nothing is attached to the model: hooks live only inside ``capture()`` (removed in ``finally``),
the model's modes are not changed, ``close()`` drops every reference to captured tensors. The first
observation clones each selected module's output once, to learn whether the model modifies it in place
(``nn.ReLU(inplace=True)``); only those modules are cloned afterwards, and a module that starts doing so later
is a ``ValueError`` rather than a silently wrong gradient.
"""

from __future__ import annotations

from ..sampler import MinerSampler
from .gradients import PATH_ANALYTIC, PATH_AUTOGRAD
from .manifest import DEFAULT_ONLINE_WEIGHTS, DEFAULT_ONLINE_WEIGHTS_REGRESSION, ONLINE_SCORE_TABLE
from .miner import STATE_FORMAT, OnlineMiner, OnlineStats
from .weighting import WeightingConfig, solve_weights

__all__ = [
    "ONLINE_SCORE_TABLE",
    "DEFAULT_ONLINE_WEIGHTS",
    "DEFAULT_ONLINE_WEIGHTS_REGRESSION",
    "PATH_ANALYTIC",
    "PATH_AUTOGRAD",
    "STATE_FORMAT",
    "WeightingConfig",
    "OnlineStats",
    "OnlineMiner",
    "MinerSampler",
    "solve_weights",
]
