"""The layer-rule registry: one small class per module type, opacus-style.

A *layer rule* knows how the per-sample gradient of one module type factors into what a forward hook sees
(the module's input ``x``) and what the backward pass delivers (``delta``, the gradient of the summed
per-sample loss with respect to the module's output). From those it returns, per sample:

* the Kronecker projection ``P_out^T G_b P_in`` of its *matrix* parameter (``G_b`` is sample ``b``'s weight
  gradient viewed as ``(shape[0], prod(shape[1:]))``);
* the exact squared norm ``||G_b||^2`` of that gradient (the "ghost norm");
* the exact per-sample gradients of its small *vector* parameters (biases, LayerNorm affine), which are cheap.

``G_b`` is never formed for the whole batch. :func:`project_and_norm` takes, per layer, the cheaper exact
route ("mixed ghost norm"): from the factors when a sample has one position or few positions (``N^2 <=
d_out*d_in``), or from ``G_b`` itself when it is smaller than the ``(N, N)`` Gram matrices (convolutions
with many output positions), built a chunk of samples at a time within ``CHUNK_ELEMENTS``.

Adding a layer type is one file: subclass :class:`LayerRule`, decorate it with
``@register_layer_rule(ModuleType)`` and import the file from ``hardmine/factored/__init__.py``.
Rules are looked up by the module's *exact* type: a subclass may override ``forward`` with different
maths, so it is never claimed silently (register it explicitly if it really computes the same thing).

A class of an *optional* dependency is registered by name instead, so that registering it imports nothing:
``@register_layer_rule("transformers.pytorch_utils.Conv1D")`` matches the module whose class's qualified name
(``f"{cls.__module__}.{cls.__qualname__}"``) is exactly that string. A name may be a glob
(``"*RMSNorm"``) for families of classes that are written anew in every model file; such a rule must then
check in :meth:`LayerRule.unsupported_reason` that the instance really computes its maths (the RMSNorm rule
runs the module on a test input). Exact types take precedence over names; names are tried in registration
order.

A rule that implements :meth:`LayerRule.gradient_factors` can share its matrix parameter with other modules
(tied weights, e.g. the input embedding reused as the LM head): the pass sums every holder's projection and
adds the cross terms ``2 <G_i, G_j>`` (:func:`factors_inner`) to the squared norm.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .graphs import autocast_state

__all__ = [
    "Call",
    "LayerRule",
    "RuleRequest",
    "RuleResult",
    "Reforwarded",
    "GramCache",
    "GradFactors",
    "factors_inner",
    "register_layer_rule",
    "rule_for",
    "registered_types",
    "registered_names",
    "qualified_name",
    "batch_chunks",
    "outer_sum_sq_norm",
    "project_and_norm",
    "route_elements",
    "ghost_route",
    "large_product",
    "split_product",
    "CHUNK_ELEMENTS",
    "SPLIT_DEVICES",
]

# Upper bound on the elements of the temporaries (Gram matrices, unfolded patches, per-chunk gradients)
# that a rule allocates at once: 2^22 elements = 16 MiB in float32. Rules split the batch to stay below
# it (one sample's worth is the floor), so a rule's extra memory does not grow with the batch.
CHUNK_ELEMENTS = 1 << 22
# Device types on which the large float32 products of :func:`project_and_norm` (a chunk's per-sample
# gradients, its Gram matrices) run as :func:`split_product`: bfloat16 tensor-core products of three-piece
# splits, exact to float32 rounding. A GPU's float32 matrix products do not use its tensor cores, while the
# training step's convolutions run in TF32 (cuDNN's default), so there a conv model's factored pass spends
# its device time in these products. None until a GPU measurement shows the split pays
# (`scripts/bench_extract.py --split-products`, a step of `scripts/gpu_measure.sh`). Read at each call; a
# captured CUDA graph keeps the products it captured. The pieces and their side-by-side copies take about
# four and a half times the operands' float32 size beyond what CHUNK_ELEMENTS counts.
SPLIT_DEVICES: frozenset[str] = frozenset()
# Whether this torch multiplies bfloat16 matrices into a float32 result on a GPU (``bmm``'s ``out_dtype``,
# torch >= 2.8); an older one keeps the float32 products there.
_BF16_INTO_FLOAT32 = hasattr(torch.ops.aten.bmm, "dtype")


@dataclass(frozen=True)
class Call:
    """One call of a module during the forward pass: its input and the gradient at its output."""

    x: torch.Tensor  # the module's (first positional) input, detached
    delta: torch.Tensor  # d(sum of per-sample losses) / d(output); row b belongs to sample b only


@dataclass(frozen=True)
class RuleRequest:
    """What the pass wants from a rule for one module."""

    # (P_out (rows, a), P_in (cols, b)), or None when the matrix parameter is not selected
    matrix: tuple[torch.Tensor, torch.Tensor] | None
    vectors: tuple[str, ...]  # local names of the selected vector parameters, e.g. ("bias",)
    # (B, a, b) view of the output the projection may be written into (saves a copy), or None
    out: torch.Tensor | None = None
    # local name -> the (numel, width) dense projection matrix of that vector parameter, for a rule that can
    # project it more cheaply itself (e.g. fused with P_out); rules may ignore it. Only float32 single-block
    # matrices are offered, so a rule's result equals the caller's own dense projection.
    vector_mats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # per-pass store of input Gram matrices shared by modules that read the same input (q/k/v), or None
    grams: GramCache | None = None
    # the rule's own scratch dict for this module, dtype and device, kept across the passes of one extractor:
    # for what the rule derives from the matrices above (e.g. a concatenation), never for batch data
    memo: dict[Any, Any] = field(default_factory=dict)


@dataclass
class RuleResult:
    matrix_proj: torch.Tensor | None = None  # (B, a, b) = P_out^T G_b P_in
    matrix_sq_norm: torch.Tensor | None = None  # (B,) exact ||G_b||_F^2
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # local name -> (B, *param.shape)
    # local name -> (B, width) projection with request.vector_mats[name], for vectors the rule projected
    vector_proj: dict[str, torch.Tensor] = field(default_factory=dict)
    # local name -> (B,) squared norm of that vector's per-sample gradient, where the rule had it anyway
    vector_sq_norm: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class GradFactors:
    """Sample ``b``'s weight gradient as a sum of outer products, ``G_b = sum_n rows[b, n] cols[b, n]^T``
    (``G`` in the parameter's own ``(shape[0], prod(shape[1:]))`` orientation), for tied weights.

    ``rows`` is ``(B, N, p)`` dense, or ``(B, N)`` integer ids standing for the one-hot rows ``e_{id}`` (an
    embedding: no ``(B, N, vocab)`` tensor is formed); ``cols`` is ``(B, N, q)``."""

    rows: torch.Tensor
    cols: torch.Tensor


class LayerRule:
    """Base class of a layer rule. Subclasses set the two class attributes and implement ``compute``."""

    #: the parameter projected with ``P_out ⊗ P_in`` (viewed as ``(shape[0], prod(shape[1:]))``), or None
    matrix_param: str | None = "weight"
    #: parameters whose exact per-sample gradient the rule returns (projected densely by the caller)
    vector_params: tuple[str, ...] = ("bias",)
    #: the rule asks ``request.grams`` for its input's Gram matrix (so modules reading one input share it)
    shares_input_gram: bool = False
    # Inputs with fewer dimensions than this are refused by check_call: e.g. a Linear called on one unbatched
    # (d_in,) vector (its first dimension would be mistaken for the batch).
    min_input_ndim: int = 1
    #: child modules (local names) whose calls inside the module this rule's :meth:`reforward` records, e.g.
    #: attention's ``("out_proj",)``: the module uses their weights through ``F.*``, so their own hooks see
    #: only the model's direct calls of them
    reforwarded_children: tuple[str, ...] = ()

    @property
    def handled_params(self) -> tuple[str, ...]:
        return ((self.matrix_param,) if self.matrix_param else ()) + self.vector_params

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this particular instance cannot be handled (a configuration the maths does not cover)."""
        return None

    def check_call(self, module: nn.Module, x: object, output: object, batch_size: int) -> str | None:
        """Why one captured call cannot be attributed per sample (e.g. the batch is not on dim 0)."""
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return "its input or output is not a single tensor"
        if x.ndim < 1 or x.shape[0] != batch_size or output.ndim < 1 or output.shape[0] != batch_size:
            return (
                f"it saw input shape {tuple(x.shape)} / output shape {tuple(output.shape)} for a batch of "
                f"{batch_size}, so the batch is not on dimension 0"
            )
        if x.ndim < self.min_input_ndim:
            return f"it was called on an unbatched input of shape {tuple(x.shape)}"
        return None

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        raise NotImplementedError

    def gradient_factors(self, module: nn.Module, calls: list[Call]) -> GradFactors | None:
        """The matrix parameter's per-sample gradient as :class:`GradFactors`, or None when the rule cannot
        say (then a parameter it shares with another module is refused). Only asked for tied weights."""
        return None

    @property
    def supports_tied(self) -> bool:
        """Whether the rule implements :meth:`gradient_factors` (so its matrix parameter may be shared)."""
        return type(self).gradient_factors is not LayerRule.gradient_factors

    def reforward(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, clone: Collection[str]
    ) -> tuple[Any, dict[str, Reforwarded]]:
        """For a module whose forward hides the linear maps of its parameters (``nn.MultiheadAttention``
        calls ``F.multi_head_attention_forward`` on its weights), computing the same output again from the
        call's inputs with those maps as tensors of the graph. Called by the module's forward hook with the
        call's arguments and ``output``; returns ``(the output the model continues with, {role: what that
        role's rule sees})``, role ``""`` being the module itself and other roles its
        :attr:`reforwarded_children`. Roles in ``clone`` hand the model a copy of their output (see
        ``capture_calls``). Only rules that set :attr:`reforwarded_children` or hide their own maps implement
        it (:attr:`reforwards`)."""
        raise NotImplementedError

    def reforward_problem(self, module: nn.Module, args: tuple, kwargs: dict) -> str | None:
        """Why this call cannot be computed again per sample (e.g. an unbatched call), checked before
        :meth:`reforward` runs; the call is then recorded as refused and the module's own output kept."""
        return None

    def draws_random(self, module: nn.Module) -> bool:
        """Whether :meth:`reforward` draws random numbers for ``module`` (dropout in training mode): then the
        pass keeps the random state before the module's forward and restores it before the reforward, so both
        draw the same."""
        return False

    @property
    def reforwards(self) -> bool:
        """Whether the rule implements :meth:`reforward` (its module's calls are recorded through it)."""
        return type(self).reforward is not LayerRule.reforward


@dataclass(frozen=True)
class Reforwarded:
    """One role's call as :meth:`LayerRule.reforward` computed it: the input of the linear map, its output (a
    tensor of the graph the model continues from) and what the model was handed in its place (``out`` itself,
    a view of it, or a copy when the role is protected)."""

    x: torch.Tensor
    out: torch.Tensor
    passed: torch.Tensor


class GramCache:
    """Gram matrices ``x x^T`` of inputs that several modules read (attention's q/k/v share theirs), computed
    once per pass. Keys come from :meth:`key`; ``readers`` says how many modules will ask for each, and an
    entry is dropped when the last one has taken it, so only Grams with readers still to come are held."""

    def __init__(self, readers: Mapping[Any, int]) -> None:
        self._left = dict(readers)
        self._grams: dict[Any, torch.Tensor] = {}

    @staticmethod
    def key(x: torch.Tensor) -> tuple[Any, ...]:
        # Readers are counted while every captured input is alive, and a reader holds its input until its rule
        # has run, so an input's storage cannot be reused by another tensor while its Gram is cached.
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)

    def release(self, key: Any) -> None:
        """A counted reader will not ask for ``key`` after all (other route, no gradient): drop one reader."""
        left = self._left.get(key, 0) - 1
        self._left[key] = max(0, left)
        if left <= 0:
            self._grams.pop(key, None)

    def get(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        left = self._left.get(key, 0)
        gram = self._grams.pop(key, None)
        if gram is None:
            gram = compute()
        if left > 1:  # more readers to come
            self._grams[key] = gram
        self._left[key] = max(0, left - 1)
        return gram


_REGISTRY: dict[type[nn.Module], LayerRule] = {}
# (qualified-name pattern, rule), in registration order: classes of optional dependencies and name families
_BY_NAME: list[tuple[str, LayerRule]] = []
# type -> rule (or None) found through the name patterns; cleared on every registration
_NAME_CACHE: dict[type, LayerRule | None] = {}


def qualified_name(cls: type) -> str:
    """``"transformers.pytorch_utils.Conv1D"``: what a rule registered by name is matched against."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_rule(
    module_type: type[nn.Module] | str,
) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: ``@register_layer_rule(nn.Linear)`` makes the rule handle exactly that module type;
    ``@register_layer_rule("pkg.module.Class")`` the class of that qualified name (a glob such as
    ``"*RMSNorm"`` matches a family), without importing its package (see the module docstring)."""
    by_name = isinstance(module_type, str)
    if by_name and not module_type:
        raise ValueError("register_layer_rule needs a module type or a non-empty qualified class name.")
    if not by_name and not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"register_layer_rule needs an nn.Module subclass, got {module_type!r}.")

    def deco(rule_cls: type[LayerRule]) -> type[LayerRule]:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, LayerRule)):
            raise ValueError(
                f"{rule_cls!r} is not a LayerRule subclass; subclass hardmine.factored.LayerRule."
            )
        if isinstance(module_type, str):
            taken = [type(r).__name__ for pat, r in _BY_NAME if pat == module_type]
            if taken:
                raise ValueError(
                    f"a layer rule for {module_type!r} is already registered ({taken[0]}); there can be "
                    "only one per name."
                )
            _BY_NAME.append((module_type, rule_cls()))
        else:
            if module_type in _REGISTRY:
                raise ValueError(
                    f"a layer rule for {module_type.__name__} is already registered "
                    f"({type(_REGISTRY[module_type]).__name__}); there can be only one per module type."
                )
            _REGISTRY[module_type] = rule_cls()
        _NAME_CACHE.clear()
        return rule_cls

    return deco


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)`` exactly, else the first rule whose name pattern matches the
    class's qualified name, or None."""
    cls = type(module)
    rule = _REGISTRY.get(cls)
    if rule is not None or not _BY_NAME:
        return rule
    if cls not in _NAME_CACHE:
        name = qualified_name(cls)
        _NAME_CACHE[cls] = next((r for pat, r in _BY_NAME if fnmatch.fnmatchcase(name, pat)), None)
    return _NAME_CACHE[cls]


def registered_types() -> list[type[nn.Module]]:
    return list(_REGISTRY)


def registered_names() -> list[str]:
    """The qualified-name patterns rules are registered under (see :func:`register_layer_rule`)."""
    return [pat for pat, _ in _BY_NAME]


# ------------------------------------------------------------------------------------------- helpers
def batch_chunks(batch_size: int, elements_per_sample: int) -> Iterator[slice]:
    """Slices of the batch such that ``len(slice) * elements_per_sample <= CHUNK_ELEMENTS`` (at least 1)."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_sample))
    for lo in range(0, batch_size, step):
        yield slice(lo, min(batch_size, lo + step))


def ghost_route(n: int, p: int, q: int) -> bool:
    # The ghost form needs an (N, N) Gram matrix per sample and group, the explicit form the (p, q) gradient:
    # take whichever is smaller (the "mixed ghost norm" rule).
    return n * n <= p * q


def route_elements(groups: int, n: int, p: int, q: int) -> int:
    """Per-sample elements of the largest temporary :func:`project_and_norm` allocates."""
    if n == 1:
        return groups * (p + q)
    return groups * (n * n if ghost_route(n, p, q) else p * q)


def large_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for the large products of a chunk ``(..., m, k) @ (..., k, n)`` (equal leading dimensions):
    :func:`split_product` for float32 operands on a device type in :data:`SPLIT_DEVICES`, else ``@``."""
    device = a.device.type
    if (
        device in SPLIT_DEVICES
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and (device == "cpu" or (device == "cuda" and _bf16_tensor_cores(a.device)))  # where split_product runs
        and not autocast_state(device)[0]  # under autocast the products round to its dtype anyway
    ):
        return split_product(a, b)
    return a @ b


@functools.cache
def _bf16_tensor_cores(device: torch.device) -> bool:
    """Whether this torch and this GPU multiply bfloat16 matrices into a float32 result: ``bmm``'s
    ``out_dtype`` (torch >= 2.8) on compute capability 8.0 or later (cuBLAS refuses it on older GPUs). Asked
    once per device: the answer cannot change while the process runs."""
    return _BF16_INTO_FLOAT32 and torch.cuda.get_device_capability(device) >= (8, 0)


def split_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of float32 ``(..., m, k)`` and ``(..., k, n)`` (equal leading dimensions) from bfloat16 pieces.

    Each operand is split into three bfloat16 pieces that add up to it (``a = a0 + a1 + a2``, each the
    rounding of what the ones before leave: 8 significant bits apiece, 24 together, float32's own). The
    product of two bfloat16 numbers is exact in float32, so the six piece products above float32's rounding
    (``a0 b0``, ``a0 b1``, ``a1 b0``, ``a0 b2``, ``a1 b1``, ``a2 b0``; the three left out are about ``2^-23``
    of ``|a||b|`` together) summed in float32 give ``a @ b`` to a few float32 steps. They are one product
    over a six-fold contraction: the pieces side by side along ``k``, the smallest products first so they
    are summed before the large ones (on the CPU a single product then lands within about one and a half
    float32 steps; largest first, up to four and a half). On a GPU that is one bfloat16 matrix product with
    float32 accumulation and output (tensor cores); on the CPU the same piece products, exact in float32,
    summed by a float32 product, which is what the CPU tests check. How a tensor core rounds inside its
    accumulation is the GPU's own: the split's accuracy there is measured against float64 (the GPU test in
    ``tests/test_host_syncs.py``, the agreement line of ``scripts/bench_extract.py --split-products``).

    Limits: below ``2^-110`` in magnitude a float32 loses the bits bfloat16 cannot hold under its smallest
    subnormal (``2^-133``), so tiny values keep fewer than 24 bits; an infinite operand, or one within
    bfloat16's rounding of float32's largest, gives NaN where ``@`` gives an infinity (both non-finite).
    """
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"split_product needs equal leading dimensions, got {tuple(a.shape)} @ {tuple(b.shape)}")
    a0, a1, a2 = _bf16_pieces(a)
    b0, b1, b2 = _bf16_pieces(b)
    left = torch.cat([a2, a1, a0, a1, a0, a0], dim=-1)  # (..., m, 6k): smallest products first
    right = torch.cat([b0, b1, b2, b0, b1, b0], dim=-2)  # (..., 6k, n)
    if left.device.type == "cpu":  # no bfloat16-into-float32 product here: the same sums in float32
        return left.float() @ right.float()  # (..., m, n)
    lead, m, n, k6 = left.shape[:-2], left.shape[-2], right.shape[-1], left.shape[-1]
    batch = math.prod(lead)  # not -1: an empty m or n leaves it undefined
    out = torch.bmm(left.reshape(batch, m, k6), right.reshape(batch, k6, n), out_dtype=torch.float32)  # (L, m, n)
    return out.reshape(*lead, m, n)  # (..., m, n)


def _bf16_pieces(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three bfloat16 tensors adding up to float32 ``t``: each rounds what the pieces before it leave (the
    remainders are exact in float32)."""
    p0 = t.to(torch.bfloat16)
    rest = t - p0.float()
    p1 = rest.to(torch.bfloat16)
    return p0, p1, (rest - p1.float()).to(torch.bfloat16)


def project_and_norm(
    delta: torch.Tensor,
    x: torch.Tensor,
    p_out: torch.Tensor | None,
    p_in: torch.Tensor | None,
    out: torch.Tensor | None = None,
    gram_x: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Kronecker projection and exact squared norm of ``G_g = sum_n delta_n x_n^T``, for one chunk of samples.

    Args:
        delta: ``(c, G, N, p)`` output gradients per group ``G`` and position ``N``.
        x: ``(c, G, N, q)`` inputs (or unfolded patches) at the same positions.
        p_out: ``(G, p, a)`` the rows of ``P_out`` belonging to each group, or None (norm only).
        p_in: ``(q, b)``, or None.
        out: optional ``(c, a, b)`` tensor to write the projection into (it is then returned).
        gram_x: optional function returning ``x @ x^T`` ``(c, G, N, N)`` (e.g. from a :class:`GramCache`), used
            instead of computing it when the ghost form is taken.

    Returns ``(sum_g P_out_g^T G_g P_in  (c, a, b) or None, sum_g ||G_g||_F^2  (c,))``. Three routes, all
    exact: one position (outer product: norms multiply), the ghost form ``sum_{n,m} (delta_n . delta_m)
    (x_n . x_m)`` when ``N^2 <= p*q``, otherwise the chunk's gradients ``G_g`` themselves (then the
    projection is read off ``G_g`` too, which is cheaper than projecting the factors).
    """
    c, g, n, p = delta.shape
    q = x.shape[-1]
    proj = None
    if n == 1:
        sq = (_sq_norm(delta) * _sq_norm(x)).sum((1, 2))  # (c,)
        if p_out is not None and p_in is not None:
            dp = _times_p_out(delta, p_out).transpose(-1, -2)  # (c, G, a, 1)
            xp = x @ p_in  # (c, G, 1, b)
            if g == 1 and out is not None:
                return torch.mul(dp[:, 0], xp[:, 0], out=out), sq  # outer products written in place
            proj = dp * xp  # (c, G, a, b) outer products
    elif ghost_route(n, p, q):
        gram_d = large_product(delta, delta.transpose(-1, -2))  # (c, G, N, N)
        gx = gram_x() if gram_x is not None else large_product(x, x.transpose(-1, -2))  # (c, G, N, N)
        sq = torch.linalg.vecdot(gram_d.reshape(c, -1), gx.reshape(c, -1))  # (c,)
        if p_out is not None and p_in is not None:
            proj = _times_p_out(delta, p_out).transpose(-1, -2) @ (x @ p_in)  # (c, G, a, N) @ (c, G, N, b)
    else:
        grad = large_product(delta.transpose(-1, -2), x)  # (c, G, p, q): this chunk's per-sample gradients
        sq = torch.linalg.vector_norm(grad, dim=(1, 2, 3)).square()  # (c,)
        if p_out is not None and p_in is not None:
            proj = p_out.transpose(-1, -2) @ grad @ p_in  # (c, G, a, b)
    if proj is not None:
        proj = proj[:, 0] if g == 1 else proj.sum(1)  # (c, a, b)
        if out is not None:
            proj = out.copy_(proj)
    return proj, sq


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm over the last dimension (``vector_norm`` needs no ``t**2`` temporary)."""
    return torch.linalg.vector_norm(t, dim=-1).square()


def _times_p_out(delta: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """``delta (c, G, N, p) @ p_out (G, p, a) -> (c, G, N, a)`` without broadcasting ``p_out`` over ``c``
    (a broadcast batched matmul expands it; one group is a plain 2-D matmul, several a bmm over groups)."""
    if p_out.shape[0] == 1:
        return delta @ p_out[0]  # (c, 1, N, a): matmul folds the leading dims into rows
    return torch.einsum("cgnp,gpa->cgna", delta, p_out)  # (c, G, N, a)


def factors_inner(f: GradFactors, g: GradFactors) -> torch.Tensor:
    """``<G_f, G_g>_F`` per sample ``(B,)``, for two uses of one tied parameter, without forming either:
    ``sum_{n,m} (rows_f[n] . rows_g[m]) (cols_f[n] . cols_g[m])``; integer ``rows`` are one-hot ids, so their
    dot products are gathers (dense) or id equalities (ids). Chunked over the batch like the rules."""
    b, n = f.rows.shape[:2]
    m = g.rows.shape[1]
    # The holders' factors may differ in dtype (e.g. an output head under autocast gives bfloat16 factors, the
    # embedding it shares its weight with float32 ones): both are multiplied in the wider one.
    dtype = torch.promote_types(f.cols.dtype, g.cols.dtype)
    out = torch.empty(b, dtype=dtype, device=f.cols.device)
    for s in batch_chunks(b, 2 * n * m):
        rf, rg = f.rows[s], g.rows[s]
        c = s.stop - s.start
        if rf.ndim == 2 and rg.ndim == 2:  # ids . ids: one when the ids are equal
            gram_r = (rf.unsqueeze(2) == rg.unsqueeze(1)).to(dtype)  # (c, N, M)
        elif rf.ndim == 2:  # e_{id_n} . rows_g[m] = rows_g[m, id_n]
            gram_r = rg.gather(2, rf.unsqueeze(1).expand(c, m, n)).transpose(1, 2)  # (c, N, M)
        elif rg.ndim == 2:
            gram_r = rf.gather(2, rg.unsqueeze(1).expand(c, n, m))  # (c, N, M)
        else:
            gram_r = rf.to(dtype) @ rg.to(dtype).transpose(1, 2)  # (c, N, M)
        gram_c = f.cols[s].to(dtype) @ g.cols[s].to(dtype).transpose(1, 2)  # (c, N, M)
        out[s] = torch.linalg.vecdot(gram_r.to(dtype).reshape(c, -1), gram_c.reshape(c, -1))  # (c,)
    return out


def outer_sum_sq_norm(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact ``||sum_n delta_n x_n^T||_F^2`` per sample, for ``delta (B, N, p)`` and ``x (B, N, q)``."""
    b, n, p = delta.shape
    out = torch.empty(b, dtype=delta.dtype, device=delta.device)
    for s in batch_chunks(b, route_elements(1, n, p, x.shape[2])):
        out[s] = project_and_norm(delta[s, None], x[s, None], None, None)[1]
    return out
