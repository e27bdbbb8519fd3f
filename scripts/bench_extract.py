"""Per-sample gradient extraction throughput and memory: train step vs naive loop vs vmap+dense vs factored.

Models (all parameters selected, ~0.53M each): MLP 784-512-256-10; CNN (2 conv + 2 fc on 3x32x32);
transformer encoder classifier (2 pre-norm layers, d_model 128, 4 heads, seq 64, vocab 1000) whose attention
is built from nn.Linear q/k/v/out projections (explicit matmul + softmax, so the factored engine covers every
weight and vmap has batching rules for every op). Batch 256, torch threads = CPU cores. ``--models resnet18``
(not in the default set: slow on a CPU) adds torchvision's ResNet-18 architecture on 32x32 images, written out
here (no torchvision needed), its convolutions and classifier selected and its BatchNorm frozen, as the
issue's H200 measurement ran it.

Methods, each producing one batch's result:

* ``train_step`` -- forward + mean loss + backward + SGD step (the reference: 1.0);
* ``naive_loop`` -- one forward + ``autograd.grad`` per sample, each gradient projected with the same
  Kronecker layout as ``factored`` (same output, computed the obvious way);
* ``vmap_dense`` -- TRAK-style: ``torch.func`` vmap(grad) per-sample gradients of every parameter, then
  one dense seeded Rademacher projection of the whole flattened gradient to the same dim (hardmine's
  blockwise ``Projector``). That matrix is ~0.53M x 4096 (~8.7 GB float32), so the Projector keeps its
  default 256 MiB of blocks and regenerates the rest from their seeds every batch, as TRAK's CPU
  projector does;
* ``factored`` -- ``GradientExtractor(engine="factored")``: one batched forward + backward, Kronecker
  projections and exact ghost norms from hooks.

Projection dim: ``factored``/``naive_loop`` use the ``dim`` whose layout totals closest to ``--target-dim``
(4096); ``vmap_dense`` uses the same total. Before timing, the script checks on a small batch that
``factored`` and ``naive_loop`` give the same vectors and norms (it exits non-zero otherwise).

Memory: each (model, method) runs in a fresh subprocess (``--no-isolate`` or ``--quick``: in-process). The
peak resident set is reset through ``/proc/self/clear_refs`` after the model and batch are built and
``peak_extra_mb = VmHWM - VmRSS(before)``: the method's own peak, including its projection matrices and
the allocator's cached buffers (tracemalloc cannot see torch's allocations).

Writes a list of rows ``{"model", "method", "samples_per_s", "ratio_to_train_step", "peak_extra_mb",
"proj_dim"}`` to ``scripts/results/bench_extract.json`` and a Markdown table to ``bench_extract.md``.
Throughput is ``batch / median seconds per batch`` over repeated timed batches after a warm-up.

``--device cuda`` (or any torch device): the models, batches and projections live there; every timed batch
is bracketed by ``torch.cuda.synchronize()``, ``peak_extra_mb`` is the device's peak allocation above what
the model and batch hold, and each train_step/factored row records ``host_syncs_per_batch`` from
``torch.profiler`` (:func:`sync_profile`: kernel launches, stream/device synchronisations, memcpy calls and
the syncing aten ops per batch).

``--keep-heap``: the worker processes run with glibc told to keep freed memory (``MALLOC_MMAP_MAX_=0``,
``MALLOC_TRIM_THRESHOLD_`` = 1 GiB), so batches stop page-faulting the heap back in (what a long scan can do
the same way); ``make bench`` writes that run to ``bench_extract_keep_heap.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hardmine.engine import GradientExtractor
from hardmine.extract import per_sample_grads
from hardmine.factored import registry
from hardmine.factored.layout import ProjectionLayout
from hardmine.project import Projector

HERE = Path(__file__).resolve().parent
MODELS = ("mlp", "cnn", "transformer")
EXTRA_MODELS = ("resnet18",)  # only when asked for (--models resnet18): slow on a CPU, measured on a GPU
METHODS = ("train_step", "naive_loop", "vmap_dense", "factored", "factored_graphs")
PAIRED = ("train_step", "factored")  # measured --repeats times, alternating
SYNC_PROFILED = (*PAIRED, "factored_graphs")  # on a GPU: kernel launches and host syncs per batch
N_CLASSES = 10
SEQ, VOCAB, D_MODEL, HEADS, FF = 64, 1000, 128, 4, 512


# ------------------------------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, 8, 8)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class _Basic(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with BatchNorm, a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ``resnet18(num_classes=10)`` architecture (7x7/2 stem and max-pool, four stages of two
    BasicBlocks, 64-512 channels, ~11.2M parameters), written out so the benchmark needs no torchvision. As in
    the issue's H200 measurement the convolutions and the classifier are selected; the BatchNorm parameters are
    frozen (``requires_grad=False``: no factored rule, and in eval mode a per-sample affine map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [_Basic(c_in, c_out, stride), _Basic(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, N_CLASSES)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)  # (B, 64, H/4, W/4)
        x = self.layers(x)  # (B, 512, H/32, W/32)
        return self.fc(x.mean((2, 3)))  # (B, C): global average pool


class Attention(nn.Module):
    """Multi-head self-attention from four nn.Linear layers (so every weight has a factored rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(D_MODEL, D_MODEL) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = d // HEADS

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, HEADS, h).transpose(1, 2)  # (B, H, T, h)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(h)  # (B, H, T, T)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        ctx = scores.softmax(-1) @ v  # (B, H, T, h)
        return self.out(ctx.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = Attention()
        self.ff1, self.ff2 = nn.Linear(D_MODEL, FF), nn.Linear(FF, D_MODEL)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL, padding_idx=0)
        self.pos = nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, N_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)  # (B, T): batch on dim 0
        x = self.tok(input_ids) + self.pos(positions)  # (B, T, d)
        keep = attention_mask.bool()
        for blk in self.blocks:
            x = blk(x, keep)
        m = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return self.head((self.ln(x) * m).sum(1) / m.sum(1).clamp_min(1.0))  # (B, C)


def build(name: str, batch: int, seed: int = 0) -> tuple[nn.Module, tuple[Any, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (batch,), generator=g)
    if name == "mlp":
        return MLP(), (torch.randn(batch, 784, generator=g), y)
    if name == "cnn":
        return CNN(), (torch.randn(batch, 3, 32, 32, generator=g), y)
    if name == "resnet18":  # 32x32 images, as the H200 measurement fed torchvision's resnet18
        return ResNet18(), (torch.randn(batch, 3, 32, 32, generator=g), y)
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (batch,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()  # (B, T): right padding
    return Transformer(), ({"input_ids": ids * mask, "attention_mask": mask}, y)


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch (tensor, dict or tuple of them) on ``device``."""
    if isinstance(obj, dict):
        return {k: v.to(device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return tuple(to_device(v, device) for v in obj)
    return obj.to(device)


def sync(device: torch.device) -> None:
    """Wait for the device (timing brackets): a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# What makes the host wait on the device (or copy to/from it), as torch.profiler names it.
SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaMemcpyAsync",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::equal",
    "aten::lift_fresh",
)
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")


def sync_profile(step: Any, device: torch.device, batches: int = 3) -> dict[str, float]:
    """Per batch, over ``batches`` runs of ``step()`` under ``torch.profiler`` (after the caller's warm-up):
    each of ``SYNC_EVENTS`` seen and ``kernel_launches`` (CUDA). The two brackets' own
    ``cudaDeviceSynchronize`` calls are not counted."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(batches):
            step()
        sync(device)
    counts = {e.key: e.count for e in prof.key_averages()}
    out = {k: counts[k] / batches for k in SYNC_EVENTS if counts.get(k)}
    if "cudaDeviceSynchronize" in out:
        out["cudaDeviceSynchronize"] = max(0.0, (counts["cudaDeviceSynchronize"] - 1) / batches)
        if not out["cudaDeviceSynchronize"]:
            del out["cudaDeviceSynchronize"]
    out["kernel_launches"] = sum(counts.get(k, 0) for k in LAUNCH_EVENTS) / batches
    return out


# aten ops that launch no kernel: views, metadata and allocation (an `aten::to` that converts has a `copy_`
# below it, which counts; one that converts nothing has no child and launches nothing).
NO_KERNEL_OPS = frozenset(
    "aten::" + n
    for n in (
        "view reshape _reshape_alias _unsafe_view t transpose permute expand expand_as as_strided as_strided_ "
        "slice select narrow unsqueeze squeeze unsqueeze_ squeeze_ transpose_ t_ unflatten flatten split split_with_sizes chunk unbind movedim "
        "alias detach lift_fresh view_as resolve_conj resolve_neg contiguous resize_ empty empty_like "
        "empty_strided new_empty new_empty_strided to _to_copy scalar_tensor result_type size stride dim "
        "is_same_size _has_compatible_shallow_copy_type set_ numpy_T mT matrix_H record_stream"
    ).split()
)


def kernel_ops(step: Any, batches: int = 2) -> dict[str, float]:
    """Per run of ``step()`` (after the caller's warm-up), on any device: the aten ops that would each be a
    kernel launch on a GPU, by name (``torch.profiler``; an op counts when no op below it counts and it is not
    in :data:`NO_KERNEL_OPS`, so an op that starts by filling its output is counted under ``fill_``). On the
    CPU this is the count the host pays dispatch and launch for on a GPU, where a small model's step is bound
    by them: a proxy that needs no GPU, not a CUDA kernel count. An op that copies and then runs its own
    kernel counts once (a CPU ``addmm`` as its bias copy; an out-of-place ``scatter`` is two CUDA kernels), a
    CPU ``any`` twice; the copies to pinned host memory and the events a GPU step adds (the online dynamics,
    the deferred checks) are no op on the CPU and are not counted; and a reference step's optimizer is one
    op per parameter here where CUDA's foreach SGD is a few kernels in all. A block recorded under
    :data:`GRAPH_REPLAY` (a CPU stand-in for a CUDA graph's replay) counts as one ``cudaGraphLaunch``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(batches):
            step()
    counts: dict[str, float] = {}

    def walk(event: Any) -> bool:
        if event.name == GRAPH_REPLAY:  # a stand-in graph replay: one launch, whatever it runs on the CPU
            counts["cudaGraphLaunch"] = counts.get("cudaGraphLaunch", 0) + 1
            return True
        below = False
        for child in event.cpu_children:
            below |= walk(child)
        if below or not event.name.startswith("aten::") or event.name in NO_KERNEL_OPS:
            return below
        counts[event.name] = counts.get(event.name, 0) + 1
        return True

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event)
    return {k: v / batches for k, v in sorted(counts.items())}


def host_ops(step: Any, batches: int = 2) -> float:
    """Per run of ``step()`` (after the caller's warm-up): every aten op the host dispatches itself, views,
    ``detach`` and other metadata ops included (an op's own ops below it are not counted again), a block under
    :data:`GRAPH_REPLAY` as one. Where a step's kernels are few (a replayed graph), what is left of the host's
    share is mostly these dispatches and the Python around them; :func:`kernel_ops` counts only those that
    launch a kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(batches):
            step()
    count = 0

    def walk(event: Any) -> None:
        nonlocal count
        if event.name == GRAPH_REPLAY or event.name.startswith("aten::"):
            count += 1
            return
        for child in event.cpu_children:  # (a record_function block: the ops inside it)
            walk(child)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event)
    return count / batches


# A CPU stand-in for a CUDA graph's replay runs the captured ops again inside record_function(GRAPH_REPLAY):
# kernel_ops counts that block as one launch, what the replay costs the host on a GPU.
GRAPH_REPLAY = "hardmine.graph_replay"


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _slice(inputs: Any, i: int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[i : i + 1] for k, v in inputs.items()}
    return inputs[i : i + 1]


def choose_dim(model: nn.Module, target: int) -> tuple[int, int]:
    """The ``dim`` whose layout over all parameters totals closest to ``target``, and that total."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    best: tuple[int, int, int] | None = None
    for dim in range(1, target + 1):
        try:
            total = ProjectionLayout(model, names, dim=dim, seed=0).out_dim
        except ValueError:  # factors too unbalanced
            continue
        cand = (abs(total - target), dim, total)
        if best is None or cand < best:
            best = cand
    assert best is not None
    return best[1], best[2]


# glibc's own environment switches (read at process start): never hand big blocks to mmap, and keep up to
# 1 GiB of freed heap instead of returning it to the OS after every batch.
KEEP_HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


# ----------------------------------------------------------------------------------------------- methods
def make_method(name: str, model: nn.Module, batch: Any, dim: int, target: int):
    """Set up ``name`` (untimed) and return ``(step, proj_dim)``: ``step()`` processes the batch once."""
    inputs, y = batch
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if name == "train_step":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(_call(model, inputs), y).backward()
            opt.step()

        return step, None
    model.eval()
    if name in ("factored", "factored_graphs"):
        ext = GradientExtractor(
            model, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy",
            # only where asked for: an older hardmine (PYTHONPATH=<checkout>) has no such argument
            **({"cuda_graphs": True} if name == "factored_graphs" else {}),
        )

        def run() -> Any:
            return ext(batch)

        run.extractor = ext  # type: ignore[attr-defined]  # measure() reports what cuda_graphs did
        return run, ext.out_dim
    if name == "naive_loop":
        layout = ProjectionLayout(model, names, dim=dim, seed=0)
        params = [p for _, p in model.named_parameters() if p.requires_grad]

        def step() -> Any:
            zs = []
            for i in range(y.shape[0]):
                loss = F.cross_entropy(_call(model, _slice(inputs, i)), y[i : i + 1])
                grads = torch.autograd.grad(loss, params)
                zs.append(
                    layout.assemble({n: layout.project_exact(n, g[None]) for n, g in zip(names, grads)})
                )
            return torch.cat(zs)  # (B, out_dim)

        return step, layout.out_dim
    if name == "vmap_dense":
        k = ProjectionLayout(model, names, dim=dim, seed=0).out_dim  # same output size as factored
        # One dense seeded matrix for the whole flattened gradient, as TRAK does. At ~0.53M x 4096 it is
        # ~8.7 GB in float32, so hardmine's Projector keeps its default 256 MiB of blocks and regenerates
        # the rest from their seeds every batch (what TRAK's CPU projector does too).
        proj = Projector(k, seed=0)

        def step() -> Any:
            psg = per_sample_grads(model, batch, "cross_entropy")
            return proj.project(psg.flat())  # (B, k)

        return step, k
    raise ValueError(f"unknown method {name!r}")


def _split_note(args: argparse.Namespace) -> str:
    if not registry.SPLIT_DEVICES:
        return ""
    return (
        "; the rules' large float32 products as bfloat16 pieces on "
        + ", ".join(sorted(registry.SPLIT_DEVICES))
        + (" (--split-products)" if args.split_products else "")
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(model_name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model, batch = build(model_name, args.batch)
    dim, _ = choose_dim(model, args.target_dim)
    model, batch = model.to(device), to_device(batch, device)
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_dev = torch.cuda.memory_allocated(device)
    before = _status_kb("VmRSS")
    if not cuda and not _reset_peak():
        print("warning: cannot reset VmHWM; peak_extra_mb includes setup", file=sys.stderr)
    step, proj_dim = make_method(method, model, batch, dim, args.target_dim)
    # Warm up for --warmup batches and --warmup-time seconds, whichever is longer: the first few hundred
    # batches of a fast model run slower (allocator and caches settling), for every method alike.
    t_warm = time.perf_counter()
    warm = 0
    while warm < args.warmup or (warm > 0 and time.perf_counter() - t_warm < args.warmup_time):
        step()
        warm += 1
    sync(device)
    times: list[float] = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()

    def more() -> bool:
        spent = time.perf_counter() - t0
        if not times or (spent < args.max_time and len(times) < args.min_iters):
            return True  # at least one batch; min_iters unless that would take over max_time
        return spent < args.min_time and len(times) < args.max_iters

    while more():
        start = time.perf_counter()
        step()
        sync(device)  # a GPU step is timed to its end, not to its last kernel launch
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / len(times)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated(device) - before_dev) / 2**20
    else:
        peak_mb = (_status_kb("VmHWM") - before) / 1024
    row = {
        "model": model_name,
        "method": method,
        "samples_per_s": args.batch / statistics.median(times),
        "peak_extra_mb": max(0.0, peak_mb),
        "proj_dim": proj_dim,
        "_iters": len(times),
        "_faults": faults,  # minor page faults per timed batch (memory the allocator got from the OS again)
        "_chunk_elements": registry.CHUNK_ELEMENTS,  # the rules' budget this row ran with
        "_split_devices": sorted(registry.SPLIT_DEVICES),  # where the rules' products ran split
    }
    if cuda and method in SYNC_PROFILED:
        row["host_syncs_per_batch"] = sync_profile(step, device)
    if method == "factored_graphs":
        row["cuda_graphs"] = step.extractor.cuda_graph_state()
        print(f"  {model_name} cuda_graphs: {row['cuda_graphs']}", file=sys.stderr, flush=True)
    return row


def check_agreement(
    model_name: str, target: int, n: int = 8, device: torch.device | str = "cpu", tf32: bool = False
) -> tuple[float, float]:
    """factored vs naive loop on ``n`` samples (on ``device``): max relative error of the vectors and of the
    norms. On a GPU both run in full float32 unless ``tf32`` (cuDNN convolutions and matmuls in TF32, cuDNN's
    default: a rounding of about 1e-3 in either result, not an error of the engine)."""
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=tf32):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return _agreement(model_name, target, n, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


def _agreement(model_name: str, target: int, n: int, device: torch.device | str) -> tuple[float, float]:
    model, (inputs, y) = build(model_name, n, seed=1)
    model.eval()
    dim, _ = choose_dim(model, target)
    device = torch.device(device)
    model, inputs, y = model.to(device), to_device(inputs, device), y.to(device)
    res = GradientExtractor(model, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")((inputs, y))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    layout = ProjectionLayout(model, names, dim=dim, seed=0)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    zs, norms = [], []
    for i in range(n):
        loss = F.cross_entropy(_call(model, _slice(inputs, i)), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        zs.append(layout.assemble({n: layout.project_exact(n, g[None]) for n, g in zip(names, grads)}))
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    z, norm = torch.cat(zs), torch.stack(norms)
    rel_z = float((res.z - z).norm(dim=1).max() / z.norm(dim=1).max())
    rel_n = float(((res.grad_norm - norm).abs() / norm).max())
    return rel_z, rel_n


# ------------------------------------------------------------------------------------------------ output
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _fmt(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append(
            [
                r["model"],
                r["method"],
                f"{r['samples_per_s']:,.0f}",
                f"{r['ratio_to_train_step']:.3f}",
                f"{r['peak_extra_mb']:,.0f}",
                "-" if r["proj_dim"] is None else str(r["proj_dim"]),
            ]
        )
    return out


HEADER = ["model", "method", "samples/s", "ratio to train_step", "peak extra MB", "proj dim"]


def targets(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["model"], r["method"]): r for r in rows}
    lines = []
    for m in MODELS + EXTRA_MODELS:
        f, v = by.get((m, "factored")), by.get((m, "vmap_dense"))
        if f is None or (m, "train_step") not in by:
            continue
        r_train = f["ratio_to_train_step"]
        ok_train = "met" if r_train >= 0.8 else "NOT met"
        line = f"{m}: factored = {r_train:.2f}x train_step (target >= 0.8: {ok_train})"
        if v is not None:
            need = 50.0 if m == "mlp" else 3.0
            r_vmap = f["samples_per_s"] / v["samples_per_s"]
            ok_vmap = "met" if r_vmap >= need else "NOT met"
            line += f", {r_vmap:.1f}x vmap_dense (target >= {need:g}: {ok_vmap})"
        lines.append(line)
        g = by.get((m, "factored_graphs"))
        if g is not None:
            r_g = g["ratio_to_train_step"]
            state = g.get("cuda_graphs") or {}
            how = f"graphs off: {state['off']}" if state.get("off") else f"{state.get('replayed', 0)} replays"
            lines.append(
                f"{m}: factored_graphs = {r_g:.2f}x train_step (target >= 0.8: {'met' if r_g >= 0.8 else 'NOT met'}; {how})"
            )
    return lines


def markdown(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    agree: dict[str, tuple[float, float]],
    spread: dict[str, str],
    agree_tf32: dict[str, tuple[float, float]] | None = None,
) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in _fmt(rows)]
    lines += ["", "Targets (factored vs train_step and vmap_dense):", ""]
    lines += [f"- {t}" for t in targets(rows)]
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "",
        f"Run: {when}, torch {torch.__version__}, "
        f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"{'' if args.device == 'cpu' else f'device {_device_name(args.device)}, '}batch "
        f"{args.batch}, target projection dim {args.target_dim}{' (--quick)' if args.quick else ''}; "
        f"median of {args.min_iters} timed batches or more (fewer, >= 1, for rows slower than "
        f"{args.max_time:g} s) after {args.warmup} warm-up batch(es) and >= {args.warmup_time:g} s of "
        "warm-up; each row in "
        f"{'a fresh subprocess' if args.isolate else 'one process'}"
        f"{' with ' + ' '.join(f'{k}={v}' for k, v in KEEP_HEAP_ENV.items()) if args.keep_heap else ''}; "
        "train_step and factored measured "
        f"{args.repeats} time(s), alternating, median repeat shown (peak memory: the largest)"
        f"; the rules' chunk budget {registry.CHUNK_ELEMENTS:,} elements"
        f"{' (--chunk-elements)' if args.chunk_elements is not None else ''}"
        f"{_split_note(args)}.",
        "Notes: all parameters selected. The transformer's attention is built from nn.Linear q/k/v/out "
        "(explicit matmul + softmax), so the factored engine covers every weight. train_step = forward + "
        "mean cross-entropy + backward + plain SGD step. naive_loop = per-sample autograd.grad + the same "
        "Kronecker projection as factored. vmap_dense = torch.func vmap(grad) + one dense seeded Rademacher "
        "projection of the whole gradient (hardmine Projector; the ~P x 4096 matrix does not fit its 256 MiB "
        "block cache, so most blocks are regenerated from seeds each batch, like TRAK's CPU projector). "
        "peak extra MB = "
        "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the method was set up.",
        f"Agreement check ({min(8, args.batch)} samples, factored vs naive loop, max relative error of "
        "vectors / norms): " + ", ".join(f"{m} {a[0]:.1e} / {a[1]:.1e}" for m, a in agree.items()),
    ]
    if agree_tf32:
        lines[-1] += (
            " (float32; with TF32 for convolutions and matmuls, where cuDNN's default is TF32 convolutions: "
            + ", ".join(f"{m} {a[0]:.1e} / {a[1]:.1e}" for m, a in agree_tf32.items())
            + ")."
        )
    if args.device != "cpu":
        lines[-1] += (
            " On this device, peak extra MB = the device's peak allocation (torch.cuda.max_memory_allocated) "
            "minus what the model and batch held, and every timed batch ends with torch.cuda.synchronize()."
        )
        synced = [r for r in rows if r.get("host_syncs_per_batch")]
        if synced:
            lines += ["", "Per batch under torch.profiler (kernel launches, host syncs and copies):", ""]
            lines += [
                f"- {r['model']} {r['method']}: "
                + ", ".join(f"{k} {v:g}" for k, v in sorted(r["host_syncs_per_batch"].items()))
                for r in synced
            ]
    if spread:
        where = "each its own process" if args.isolate else "one process"
        lines += ["", f"Repeats, in run order ({where}; page faults: min-max over the repeats):", ""]
        lines += [f"- {v}" for v in spread.values()]
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(dev)})"
    return device


def parse_device(ap: argparse.ArgumentParser, value: str) -> torch.device:
    """``--device``: a torch device this machine has (else the parser's usage error)."""
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        ap.error(f"--device={value!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device={value} but torch sees no CUDA device here")
    return device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="tiny smoke run: batch 4, dim 16, 1 timed batch, in-process"
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--target-dim", type=int, default=4096)
    ap.add_argument("--min-time", type=float, default=10.0, help="seconds of timed batches per row (at least)")
    ap.add_argument(
        "--max-time", type=float, default=60.0, help="stop before min-iters past this (slow rows)"
    )
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up batches (at least)")
    ap.add_argument(
        "--warmup-time", type=float, default=2.0, help="warm-up seconds (at least, after one batch)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="times train_step and factored are measured, alternating (each: median of the repeats)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPU cores)")
    ap.add_argument("--device", default="cpu", help="torch device of the models and batches, e.g. cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument(
        "--methods",
        help=f"comma-separated, of {', '.join(METHODS)} (default: all; factored_graphs only with --device cuda, "
        "since CUDA graphs apply only there)",
    )
    ap.add_argument(
        "--no-isolate", dest="isolate", action="store_false", help="run every row in this process"
    )
    ap.add_argument(
        "--keep-heap",
        action="store_true",
        help="run the workers with glibc keeping freed memory ("
        + " ".join(f"{k}={v}" for k, v in KEEP_HEAP_ENV.items())
        + ")",
    )
    ap.add_argument(
        "--chunk-elements",
        type=int,
        default=None,
        help="the factored rules' chunk budget (hardmine.factored.registry.CHUNK_ELEMENTS; default: the "
        "library's): how many elements a rule's temporaries may hold at once, so how many chunks a batch is "
        "split into",
    )
    ap.add_argument(
        "--split-products",
        action="store_true",
        help="the factored rules' large float32 products on --device as bfloat16 pieces "
        "(hardmine.factored.registry.SPLIT_DEVICES; default: the library's, none): the candidate for "
        "conv models on a GPU, whose float32 products do not use the tensor cores",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_extract.json")
    ap.add_argument("--md", type=Path, default=None, help="Markdown table (default: --out with .md)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.target_dim, args.min_time, args.min_iters, args.warmup, args.isolate = (
            4,
            16,
            0.0,
            1,
            0,
            False,
        )
        args.warmup_time = 0.0
        args.repeats = 1
    if args.keep_heap and not args.isolate:
        ap.error(
            "--keep-heap sets the allocator of the worker processes; it needs them (drop --quick / "
            "--no-isolate)"
        )
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be at least 1")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads={args.threads} must be at least 1")
    parse_device(ap, args.device)  # a usage error now, not in a worker
    if args.chunk_elements is not None:
        if args.chunk_elements < 1:
            ap.error(f"--chunk-elements={args.chunk_elements} must be at least 1")
        registry.CHUNK_ELEMENTS = args.chunk_elements  # read by the rules at each call
    if args.split_products:
        registry.SPLIT_DEVICES = frozenset({torch.device(args.device).type})  # read by the rules at each call
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1], args)))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.methods is None:
        cuda = torch.device(args.device).type == "cuda"
        args.methods = ",".join(m for m in METHODS if cuda or m != "factored_graphs")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS + EXTRA_MODELS] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown model/method {bad}; choose from {MODELS + EXTRA_MODELS} and {METHODS}")

    agree = {}
    agree_tf32 = {}
    for m in models:
        agree[m] = check_agreement(m, args.target_dim, n=min(8, args.batch), device=args.device)
        rel_z, rel_n = agree[m]
        print(f"agreement {m}: factored vs naive loop, max rel. error vectors {rel_z:.1e}, norms {rel_n:.1e}")
        if agree[m][0] > 1e-3 or agree[m][1] > 1e-4:
            sys.exit(f"factored and naive loop disagree on {m}: {agree[m]}")
        if torch.device(args.device).type == "cuda":  # what TF32 (the GPU's default for convolutions) changes
            tz, tn = check_agreement(m, args.target_dim, n=min(8, args.batch), device=args.device, tf32=True)
            agree_tf32[m] = (tz, tn)
            print(f"agreement {m} with TF32: max rel. error vectors {tz:.1e}, norms {tn:.1e}")

    def run_row(m: str, meth: str) -> dict[str, Any]:
        if args.isolate:
            cmd = [sys.executable, __file__, "--worker", m, meth]
            flags = (
                "batch",
                "target_dim",
                "min_time",
                "max_time",
                "min_iters",
                "max_iters",
                "warmup",
                "warmup_time",
                "threads",
                "device",
                "chunk_elements",
            )
            for flag in (f for f in flags if getattr(args, f) is not None):
                cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
            if args.split_products:
                cmd.append("--split-products")
            env = {**os.environ, **KEEP_HEAP_ENV} if args.keep_heap else None
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = measure(m, meth, args)
        speed, iters = row["samples_per_s"], row.pop("_iters")
        if row.pop("_chunk_elements") != registry.CHUNK_ELEMENTS:  # a worker that did not get --chunk-elements
            sys.exit(f"{m} {meth} ran with another chunk budget than {registry.CHUNK_ELEMENTS:,}")
        if row.pop("_split_devices") != sorted(registry.SPLIT_DEVICES):  # a worker without --split-products
            sys.exit(f"{m} {meth} ran with other split devices than {sorted(registry.SPLIT_DEVICES)}")
        print(
            f"  {m:12s} {meth:11s} {speed:10,.0f} samples/s  ({iters} batches, "
            f"{row['_faults']:,.0f} page faults/batch)",
            flush=True,
        )
        return row

    # train_step and factored (the ratio the target is about) are measured --repeats times, alternating, so
    # a slow spell of a shared machine hits both instead of one; each gets the median of its repeats. The
    # slow reference rows run once.
    paired = [x for x in methods if x in PAIRED]
    rows: list[dict[str, Any]] = []
    spread: dict[str, str] = {}  # model -> what the repeats of the paired methods measured
    for m in models:
        runs: dict[str, list[dict[str, Any]]] = {meth: [] for meth in methods}
        for _ in range(args.repeats):
            for meth in paired:
                runs[meth].append(run_row(m, meth))
        if len(paired) == 2:
            tr, fa = runs["train_step"], runs["factored"]
            pairs = ", ".join(f"{f['samples_per_s'] / t['samples_per_s']:.2f}" for t, f in zip(tr, fa))
            faults = {meth: [r["_faults"] for r in runs[meth]] for meth in PAIRED}
            flt = "; ".join(f"{k} {min(v):,.0f}-{max(v):,.0f}" for k, v in faults.items())
            spread[m] = f"{m}: factored/train_step per pair {pairs} (page faults per batch: {flt})"
        for meth in methods:
            if meth not in PAIRED:
                runs[meth].append(run_row(m, meth))
        for meth in methods:
            got = sorted(runs[meth], key=lambda r: r["samples_per_s"])
            row = dict(got[(len(got) - 1) // 2])  # the median repeat (lower middle for an even count)
            row["peak_extra_mb"] = max(r["peak_extra_mb"] for r in got)  # memory: the worst repeat
            rows.append(row)
    for m in models:
        base = next(
            (r["samples_per_s"] for r in rows if r["model"] == m and r["method"] == "train_step"), None
        )
        for r in rows:
            if r["model"] == m:
                r["ratio_to_train_step"] = (r["samples_per_s"] / base) if base else float("nan")
    keys = ["model", "method", "samples_per_s", "ratio_to_train_step", "peak_extra_mb", "proj_dim"]
    extra = ["host_syncs_per_batch", "cuda_graphs"]  # on a GPU only; factored_graphs only
    rows = [{k: r[k] for k in keys + [e for e in extra if e in r]} for r in rows]
    for r in rows:
        r["samples_per_s"] = round(r["samples_per_s"], 1)
        r["ratio_to_train_step"] = round(r["ratio_to_train_step"], 4)
        r["peak_extra_mb"] = round(r["peak_extra_mb"], 1)

    table = [HEADER] + _fmt(rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    print()
    for row in table:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print()
    for t in targets(rows):
        print(t)
    _atomic_write(args.out, json.dumps(rows, indent=1) + "\n")
    md = args.md or args.out.with_suffix(".md")
    _atomic_write(md, markdown(rows, args, agree, spread, agree_tf32))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
