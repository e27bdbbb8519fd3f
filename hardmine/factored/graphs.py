"""Replaying a steady-state factored pass as a CUDA graph (``GradientExtractor(cuda_graphs=True)``).

On a GPU the factored pass is bound by the host, not the device: a transformer batch launches a few hundred
small kernels, and Python and the dispatcher take longer to issue them than the GPU takes to run them (measured
on an H200: ``docs/benchmarks.md``). A CUDA graph records the kernels of one pass once and launches them all
again with one call, so the host's share of a batch drops to copying the batch in and the results out.

:class:`PassGraphs` does this for a pure function ``fn(leaves) -> tuple of tensors`` (the engine passes the
batch's tensors and gets the value-check flags and the four results back; ``OnlineMiner(cuda_graphs=True)``
passes a step's tensors after the user's forward, ``hardmine.online.device_step``); :class:`PlanGraphs` keeps a
caller's graphs for the plan in use:

* a batch *signature* (its structure, each tensor's shape, dtype and device, every other leaf's value, and what
  the caller adds: the engine adds the loss, grad mode and the numerics settings, :func:`numerics`) is run eagerly
  ``warmup`` times, then captured: the batch is copied into static input tensors, ``fn`` runs once on a side
  stream (lazy set-ups such as cuBLAS workspaces happen outside the capture), then once under capture, and
  the graph is replayed. Later batches of that signature are copied into the static inputs and replayed; the
  outputs are cloned, so a batch's results never change when the next one runs;
* a signature seen fewer times (the last, shorter batch of a scan) stays eager, and at most ``max_graphs`` are
  kept (the first ones; later shapes run eagerly);
* the first replay on a batch other than the captured one is compared with an eager pass of that batch: a
  pass whose result depended on something the graph froze (a value read on the host at capture time) differs,
  and graphs are switched off for good, with a warning;
* a capture, or that first comparison, that fails (an operation a graph cannot hold, memory) switches graphs
  off with a warning and drops them, and the batch runs eagerly: ``cuda_graphs=True`` can make a scan faster,
  never fail;
* what else a graph holds is the caller's ``state`` (the engine: every parameter's and buffer's storage, dtype
  and ``requires_grad``, and the model's hooks): when it changes (the model was moved, a weight replaced, cast
  or frozen, a hook added or removed), the graphs are dropped and captured again; after ``max_captures`` graphs
  are switched off (what the pass reads keeps changing). :meth:`PassGraphs.reset` drops
  them when the caller's plan changes.

All graphs share one memory pool, which keeps about one pass's peak memory reserved for as long as graphs are
kept.

The capture itself is behind :class:`GraphBackend` (``CudaGraphs`` on a GPU), so the bookkeeping above is
tested on the CPU with a stand-in that calls ``fn`` again on the static inputs.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "CudaGraphs",
    "GraphBackend",
    "Numerics",
    "PassGraphs",
    "PlanGraphs",
    "autocast_state",
    "batch_signature",
    "module_state",
    "numerics",
]

logger = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]
PassFn = Callable[[list[torch.Tensor]], Outputs]


class GraphBackend(Protocol):
    """How one pass is captured: ``capture(fn)`` runs ``fn()`` under capture and returns ``(replay, outputs)``,
    where ``replay()`` recomputes ``outputs`` in place from the tensors ``fn`` read."""

    def capture(self, fn: Callable[[], Outputs]) -> tuple[Callable[[], None], Outputs]: ...


class CudaGraphs:
    """:class:`GraphBackend` of one CUDA device: a side stream for the warm-up run and the capture (as
    ``torch.cuda.make_graphed_callables`` does), one memory pool shared by the graphs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Outputs]) -> tuple[Callable[[], None], Outputs]:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # the static inputs were written on the current stream
        with torch.cuda.stream(self.stream):
            fn()  # warm-up on the capture stream: lazy allocations and handles, outside the graph
        graph = torch.cuda.CUDAGraph()
        # thread_local: a scan's background threads (shard writer, population sums) may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        current.wait_stream(self.stream)
        return graph.replay, out


def batch_signature(leaves: Sequence[Any], structure: Hashable) -> Hashable | None:
    """What a graph of a pass over these leaves is valid for: the structure and, per leaf, a tensor's shape,
    dtype and device or another leaf's value. ``None`` when it cannot be captured (a leaf needing a gradient,
    an unhashable value)."""
    key: list[Hashable] = [structure]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.requires_grad:
                return None
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(("value", type(leaf), leaf))
    return tuple(key)


def autocast_state(device_type: str) -> tuple[bool, Any]:
    """Whether autocast is on for ``device_type`` and its dtype (torch >= 2.4; older: the per-device calls)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: no device-type argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


# Settings that choose the kernels of a pass (precision, algorithms), read per batch into a graph's key. Each
# is read where this torch has it; the TF32 flags through the newer fp32_precision API where it exists, since
# reading the legacy flag raises once the two APIs were mixed.
_NUMERIC_SETTINGS = (
    "backends.fp32_precision",
    "backends.cuda.matmul.fp32_precision",
    "backends.cudnn.conv.fp32_precision",
    "backends.cudnn.rnn.fp32_precision",
    "backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
    "backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
    "backends.cudnn.deterministic",
    "backends.cudnn.benchmark",
)
_NUMERIC_CALLS = (
    "get_float32_matmul_precision",
    "are_deterministic_algorithms_enabled",
    "backends.cuda.flash_sdp_enabled",
    "backends.cuda.mem_efficient_sdp_enabled",
    "backends.cuda.math_sdp_enabled",
    "backends.cuda.cudnn_sdp_enabled",
)


class Numerics:
    """:func:`numerics` with each setting's owner (``torch.backends.cudnn.conv`` for its ``fp32_precision``)
    looked up once, at construction: a caller that keys every batch on the settings (:class:`PlanGraphs`) makes
    one, so a step reads each setting with one attribute access (the lookups from ``torch`` cost a small step
    on a GPU about as much as the rest of its host work). The values are read at every call."""

    def __init__(self) -> None:
        self._readers = tuple(_reader(*_owner(path)) for path in _NUMERIC_SETTINGS)
        self._calls = tuple(_owner(path) for path in _NUMERIC_CALLS)
        self._legacy = not hasattr(torch.backends, "fp32_precision")  # torch < 2.9: the legacy TF32 flags

    def __call__(self, device_type: str) -> tuple[Any, ...] | None:
        """The settings a graph of the pass freezes (autocast, TF32 and precision, deterministic algorithms,
        attention backends), or ``None`` when one cannot be read (the pass then runs eagerly)."""
        try:
            values: list[Any] = [autocast_state(device_type)]
            values += [read() for read in self._readers]
            for owner, name in self._calls:
                fn = getattr(owner, name, None)
                values.append(fn() if callable(fn) else None)
            if self._legacy:
                values += [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
            return tuple(values)
        except Exception:  # noqa: BLE001  an unreadable setting: no graph rather than a wrong one
            return None


def numerics(device_type: str) -> tuple[Any, ...] | None:
    """The settings a graph of the pass freezes (autocast, TF32 and precision, deterministic algorithms,
    attention backends), or ``None`` when one cannot be read (the pass then runs eagerly). Per batch, a
    :class:`Numerics` made once reads the same for less."""
    return Numerics()(device_type)


def _owner(path: str) -> tuple[Any, str]:
    """``(the object holding the setting, its name)``; the object ``None`` where this torch has no such path."""
    owner, _, name = path.rpartition(".")
    return (_lookup(owner) if owner else torch), name


def _reader(owner: Any, name: str) -> Callable[[], Any]:
    """A function reading ``owner.<name>`` (``None`` where this torch has no such setting). A flag of
    ``torch.backends`` that is a property is read through its getter, and a cuDNN ``fp32_precision`` through
    torch's getter of its backend and op: the same value, without the lookup through the property module,
    which is most of a setting's read (the key is read every step). Taken only where it reads what the
    attribute says."""

    def plain() -> Any:
        return getattr(owner, name, None)  # (a missing owner is None, which has no such attribute)

    direct: Callable[[], Any]
    getter = getattr(vars(type(owner)).get(name), "getter", None)  # a ContextProp's (every type has a __dict__)
    fp32 = getattr(getattr(torch, "_C", None), "_get_fp32_precision_getter", None)
    if callable(getter):
        direct = getter
    elif name == "fp32_precision" and callable(fp32) and type(owner).__name__ == "_FP32Precision":
        backend, op = owner.backend, owner.op
        direct = functools.partial(fp32, backend, op)
    else:
        return plain
    try:  # a shortcut that does not read what the attribute says now is not taken
        if direct() == plain():
            return direct
    except Exception:  # noqa: BLE001  (the attribute's own error is raised where it is read)
        pass
    return plain


def _lookup(path: str) -> Any:
    obj: Any = torch
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def module_state(modules: Iterable[nn.Module]) -> Hashable:
    """What a graph of a pass reads from these modules besides its inputs: every parameter's and buffer's
    storage and dtype, which parameters need a gradient, and the modules' hooks (a replay runs none): their
    count and the newest handle id, which moves whenever one is added. One walk over the modules."""
    tensors: list[tuple[int, torch.dtype, bool]] = []
    n_hooks, newest = 0, -1
    for m in modules:
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                tensors.append((t.data_ptr(), t.dtype, t.requires_grad))
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            if hooks:
                n_hooks += len(hooks)
                newest = max(newest, *hooks)
    return tuple(tensors), n_hooks, newest


# A small step's inputs and results are a dozen tensors, each a kernel to copy in or clone out, which on a GPU
# costs the host more than the graph's own launch: contiguous inputs of at most PACK_BYTES are copied in
# together and results of at most RESULT_PACK_BYTES cloned out together, one kernel per device whatever their
# dtypes (their bytes share one buffer); larger ones keep a copy of their own. Results packed together share
# one buffer, which any of them keeps alive: the bound on results is small, so keeping a step's weights keeps
# kilobytes, not its projected gradients.
PACK_BYTES = 1 << 20
RESULT_PACK_BYTES = 1 << 16
# Where a packed tensor starts in its buffer: a multiple of this many bytes, so its view is as aligned as a
# tensor of its own for vectorised kernels (and its element size, at most 16 bytes, divides its offset).
PACK_ALIGN = 64


@dataclass(frozen=True)
class _Pack:
    """Small tensors of one device, of any dtypes, laid out in one flat byte buffer, each at an aligned
    offset."""

    buffer: torch.Tensor  # (total bytes,) uint8, a multiple of PACK_ALIGN
    members: tuple[int, ...]  # which tensors (indices into the caller's list)
    offsets: tuple[int, ...]  # where each starts in ``buffer``, in bytes
    pads: tuple[torch.Tensor | None, ...]  # the bytes that fill the gap after each (copied in with it), or None

    def view(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """The member at byte ``offset`` with ``like``'s shape and dtype, as a view of the buffer."""
        typed = self.buffer.view(like.dtype)  # (total bytes / element size,)
        start = offset // like.element_size()
        return typed[start : start + like.numel()].view(like.shape)  # (numel,) -> the member's shape

    def fill(self, tensors: Sequence[torch.Tensor]) -> None:
        """Write the members' new values into the buffer: one ``cat`` of their bytes."""
        parts: list[torch.Tensor] = []
        for i, pad in zip(self.members, self.pads):  # one pad (or None) per member
            parts.append(_as_bytes(tensors[i]))
            if pad is not None:
                parts.append(pad)
        torch.cat(parts, out=self.buffer)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as bytes, ``(numel * element size,)`` uint8: a view where ``t`` flattens to unit stride,
    else a copy (a strided view such as a column, one element with another stride, a conjugate or negative
    view; a batch's leaf need not have the strides it had at capture)."""
    flat = t if t.dim() == 1 else t.reshape(-1)  # (numel,)  (a 1-D tensor's reshape would only alias it: an op)
    try:
        return flat.view(torch.uint8)  # (numel * element size,)
    except RuntimeError:
        return flat.resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _packs(tensors: Sequence[torch.Tensor], limit: int, *, contiguous: bool) -> list[_Pack]:
    """The :class:`_Pack` of each device with at least two tensors of at most ``limit`` bytes (only contiguous
    ones with ``contiguous``: a graph then reads each input in the memory format the eager pass does), none
    needing a gradient (its bytes would hand it back detached)."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        small = t.numel() * t.element_size() <= limit and not t.requires_grad
        if small and (t.is_contiguous() or not contiguous):
            groups.setdefault(t.device, []).append(i)
    packs = []
    for device, members in groups.items():
        if len(members) < 2:
            continue
        offsets, gaps, end = [], [], 0
        for i in members:
            offsets.append(end)
            n = tensors[i].numel() * tensors[i].element_size()
            gaps.append(-n % PACK_ALIGN)
            end += n + gaps[-1]
        pads = tuple(_bytes(g, device) if g else None for g in gaps)
        packs.append(_Pack(_bytes(end, device), tuple(members), tuple(offsets), pads))
    return packs


def _bytes(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, device=device)  # (n,)


# Where a pass's result lies: (typed view, offset in elements, shape, strides) of a view of a packed buffer
# (the typed view an index into _Graph.views), or (output, 0, None, None) for a result that is an output of its
# own.
_Result = tuple[int, int, tuple[int, ...] | None, tuple[int, ...] | None]


@dataclass
class _Graph:
    static: list[torch.Tensor]  # the tensors the graph reads (own copies, or views of a pack's buffer)
    copies: list[tuple[torch.Tensor, int]]  # (static tensor, index of the leaf tensor copied into it)
    packs: list[_Pack]  # the small leaf tensors, copied in together per device
    outputs: Outputs  # what it writes (packed results and results of their own): cloned out per batch
    views: tuple[tuple[int, torch.dtype], ...]  # (output, dtype): the typed views of packed outputs a replay makes
    results: tuple[_Result, ...]  # where each result lies in ``outputs``
    replay: Callable[[], None]
    checked: bool = False  # compared with an eager pass on a batch other than the captured one


class PassGraphs:
    """Eager, capture or replay per batch signature (module docstring). ``disabled`` says why graphs are off
    (``None`` while they are on)."""

    def __init__(
        self,
        backend: GraphBackend,
        *,
        what: str,
        warmup: int = 2,
        max_graphs: int = 2,
        max_captures: int = 8,
    ) -> None:
        self.backend = backend
        self.what = what  # the pass, as the warning names it
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.max_captures = max_captures  # beyond: what the pass reads keeps changing, and graphs do not pay
        self.disabled: str | None = None
        self.captured = 0  # graphs captured so far (a count for tests and metadata)
        self.replayed = 0
        self._graphs: dict[Hashable, _Graph] = {}
        self._seen: Counter[Hashable] = Counter()
        self._state: Hashable = None

    def disable(self, why: str) -> None:
        """Switch graphs off for good (a warning, once) and drop the captured ones."""
        if self.disabled is None:
            logger.warning("cuda_graphs: switched off, running %s eagerly: %s", self.what, why)
        self.disabled = why
        self._graphs.clear()

    def reset(self, backend: GraphBackend | None = None) -> None:
        """Drop every graph and count (the caller's plan changed), optionally with a new backend."""
        self._graphs.clear()
        self._seen.clear()
        self._state = None
        if backend is not None:
            self.backend = backend

    def __call__(self, fn: PassFn, leaves: list[Any], key: Hashable | None, state: Hashable) -> Outputs:
        """``fn(leaves)``, eagerly or by a graph of it; ``key`` from :func:`batch_signature` (``None``: eagerly),
        ``state`` what else ``fn`` reads that a graph freezes (module docstring)."""
        if self.disabled is not None or key is None:
            return fn(leaves)
        if state != self._state:  # a graph holds the old storage or settings: capture again
            self._graphs.clear()
            self._seen.clear()
            self._state = state
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] += 1
            if self._seen[key] <= self.warmup or len(self._graphs) >= self.max_graphs:
                return fn(leaves)
            if self.captured >= self.max_captures:
                self.disable(
                    f"{self.captured} captures so far: the batch signatures or what the pass reads (weights, "
                    "hooks, settings) keep changing"
                )
                return fn(leaves)
            try:
                graph = self._capture(fn, leaves)
            except ValueError:
                raise  # the batch's own error, which the eager pass raises too
            except Exception as exc:  # noqa: BLE001  any capture failure: the eager pass stays correct
                self.disable(f"the capture failed ({_first_line(exc)})")
                return fn(leaves)
            self._graphs[key] = graph
            self.captured += 1
            return self._replay(graph, leaves)
        out = self._replay(graph, leaves)
        if graph.checked:
            return out
        try:
            eager = fn(leaves)
        except ValueError:
            raise  # the batch's own error, which the eager pass raises too
        except Exception as exc:  # noqa: BLE001  e.g. out of memory with the graphs' pool held
            del graph, out  # the pool's memory is free again once no graph holds it
            self.disable(f"the eager pass checking the first replay failed ({_first_line(exc)})")
            return fn(leaves)
        diff = _difference(out, eager)
        if diff is not None:
            self.disable(f"a replayed pass differed from the eager pass of the same batch ({diff})")
            return eager
        # A batch with NaN or inf in its results compares only its finite values: the next replay checks again.
        graph.checked = all(bool(torch.isfinite(t).all()) for t in eager if torch.is_floating_point(t))
        return out

    def _capture(self, fn: PassFn, leaves: list[Any]) -> _Graph:
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        packs = _packs(tensors, PACK_BYTES, contiguous=True)
        static: list[torch.Tensor | None] = [None] * len(tensors)
        for pack in packs:
            pack.fill(tensors)
            for i, o in zip(pack.members, pack.offsets):
                static[i] = pack.view(o, tensors[i])
        copies = [(t.clone(), i) for i, t in enumerate(tensors) if static[i] is None]
        for s, i in copies:
            static[i] = s
        it = iter(static)
        args = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        results: list[_Result] = []
        views: list[tuple[int, torch.dtype]] = []

        def run() -> Outputs:
            # the pass, its small results gathered inside the graph (so a replay clones one buffer instead of
            # each result); ``results`` says where each lies, ``views`` which typed views of a buffer they need
            got = fn(args)
            packs_out = _packs(got, RESULT_PACK_BYTES, contiguous=False)
            where: dict[int, tuple[int, int]] = {}
            views.clear()
            for k, pack in enumerate(packs_out):
                pack.fill(got)
                for i, o in zip(pack.members, pack.offsets):
                    if (k, got[i].dtype) not in views:
                        views.append((k, got[i].dtype))
                    where[i] = (views.index((k, got[i].dtype)), o // got[i].element_size())
            own = [i for i in range(len(got)) if i not in where]
            results[:] = [
                # a fresh tensor's strides are the contiguous ones (on "meta": nothing allocated)
                (*where[i], tuple(got[i].shape), torch.empty(got[i].shape, device="meta").stride()) if i in where
                else (len(packs_out) + own.index(i), 0, None, None)
                for i in range(len(got))
            ]
            return (*(p.buffer for p in packs_out), *(got[i] for i in own))

        replay, outputs = self.backend.capture(run)
        return _Graph(
            [t for t in static if t is not None], copies, packs, outputs, tuple(views), tuple(results), replay
        )

    def _replay(self, graph: _Graph, leaves: list[Any]) -> Outputs:
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        for s, i in graph.copies:
            s.copy_(tensors[i])
        for pack in graph.packs:
            pack.fill(tensors)
        graph.replay()
        self.replayed += 1
        out = [t.clone() for t in graph.outputs]
        typed = [out[k].view(dtype) for k, dtype in graph.views]  # (buffer bytes / element size,)
        # a packed result: a view of its buffer (as_strided: one host op, where a slice and a view are two)
        return tuple(
            out[i] if shape is None else typed[i].as_strided(shape, strides, o) for i, o, shape, strides in graph.results
        )


_NO_PLAN = object()  # equal to no caller's plan


class PlanGraphs:
    """The :class:`PassGraphs` of one caller's pass (an extractor's, an online miner's) for the plan in use:
    made on the first call, dropped and set up again whenever the caller's plan changes (its units, its device:
    a graph holds the pass of the plan it was captured with), and ``None`` where graphs do not apply or were
    switched off. ``backend``: a stand-in :class:`GraphBackend` (tests: on the CPU); default :class:`CudaGraphs`
    of the plan's device, which graphs need."""

    def __init__(self, requested: bool, what: str) -> None:
        self.requested = requested
        self.what = what  # the pass, as the log names it
        self.backend: GraphBackend | None = None
        self.graphs: PassGraphs | None = None
        self.off: str | None = None  # why graphs do not apply to the plan in use
        self.numerics = Numerics()  # the caller's reader of the settings its graph keys hold
        self._plan: Hashable = _NO_PLAN

    def for_plan(
        self, plan: Hashable, device: torch.device, why_not: Callable[[], str | None]
    ) -> PassGraphs | None:
        """The graphs of ``plan`` on ``device``, or ``None``: not requested, switched off, or not applicable
        (not a CUDA device without a stand-in backend, or ``why_not()``'s reason, asked once per plan)."""
        if not self.requested:
            return None
        if plan != self._plan:
            self._plan = plan
            if device.type != "cuda" and self.backend is None:
                self.off = f"the model is on {device}, not a CUDA device"
            else:
                self.off = why_not()
            if self.off is not None:
                logger.info("cuda_graphs=True does not apply: %s; %s runs eagerly", self.off, self.what)
                if self.graphs is not None:
                    self.graphs.reset()
            else:
                backend = self.backend if self.backend is not None else CudaGraphs(device)
                if self.graphs is None:
                    self.graphs = PassGraphs(backend, what=self.what)
                else:
                    self.graphs.reset(backend)
        if self.off is not None or self.graphs is None or self.graphs.disabled is not None:
            return None
        return self.graphs

    def state(self) -> dict[str, Any]:
        """What graphs did: asked for, captured and replayed, and why they are off (if so)."""
        g = self.graphs
        return {
            "requested": self.requested,
            "captured": g.captured if g is not None else 0,
            "replayed": g.replayed if g is not None else 0,
            "off": (g.disabled if g is not None else None) or self.off,
        }


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _difference(got: Outputs, want: Outputs) -> str | None:
    """Why two passes' outputs differ beyond float rounding (``None`` when they agree): NaN and inf where the
    other has them too count as equal (a batch with a NaN input is refused by its flags, not here). A sync,
    once per graph."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {tuple(a.shape)} {a.dtype} instead of {tuple(b.shape)} {b.dtype}"
        if not torch.is_floating_point(a):  # flags (bool) and integers: exactly
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        # the tolerance from the finite values: one NaN or inf must not make every difference pass (or fail);
        # a few rounding steps of the dtype (an atomic-add kernel may sum in another order each run)
        scale = float(torch.nan_to_num(b.detach(), nan=0.0, posinf=0.0, neginf=0.0).abs().max()) if b.numel() else 0.0
        rtol = max(1e-4, 4 * torch.finfo(a.dtype).eps)
        close = torch.isclose(a, b, rtol=rtol, atol=rtol / 10 * max(scale, 1e-12), equal_nan=True)
        if not bool(close.all()):
            gap = torch.nan_to_num((a - b).abs()[~close], nan=float("inf")).max()  # NaN against a number: inf
            return f"output {i}: max difference {float(gap):.3g} at scale {scale:.3g}"
    return None
