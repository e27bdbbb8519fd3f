"""Causal language models: per-token statistics of a batch, the per-sample LM columns of the manifest and the
rows of ``tokens.parquet``.

Convention (Hugging Face's): a batch carries ``input_ids``, optionally ``attention_mask`` (0 = padding) and
``labels`` of the same shape, ``-100`` where a token is not a target (prompt, padding). The model's logits at
position ``t`` predict the token at ``t + 1``, so the statistics of the token at padded index ``j`` come from
the logits at ``j - 1`` and the first token of a row has none. A sample's loss (``hardmine.losses``) is the
mean (``token_reduction="mean"``, default) or the sum of the NLL of its target tokens.

Per-sample columns (``lm_sample_stats``; defined in ``hardmine.score.SCORE_TABLE``), over the target tokens:
``perplexity`` = ``exp(mean NLL)`` (whatever the token reduction, so it never grows with length),
``n_target_tokens``, ``token_entropy_mean`` (mean entropy in nats of the predictive distribution),
``top1_miss_rate`` (share of targets that are not the model's top prediction) and ``max_token_loss``.

``tokens.parquet`` (``TOKEN_COLUMNS``): one row per non-padding token, in scan order then position:
``sample_id`` (the manifest's dtype), ``position`` (int32, 0-based index among the row's non-padding tokens),
``token_id`` (int64), ``token`` (the tokenizer's ``decode([token_id])``; null without a tokenizer),
``is_target`` (bool: the token is in the sample's loss), ``loss`` (float32 NLL of the token given its prefix),
``entropy`` (float32, nats, of the distribution that predicted it) and ``top1`` (bool: the model's top
prediction was this token); the last three are null for the first token of a row (nothing predicts it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .batches import to_host_async
from .losses import IGNORE_INDEX

__all__ = ["LM_ARCHITECTURE_SUFFIXES", "LM_SAMPLE_COLUMNS", "TOKEN_COLUMNS", "is_causal_lm_architecture", "TokenStats", "TokenTable", "lm_sample_stats", "token_schema",
           "token_stats"]

logger = logging.getLogger(__name__)

# Hugging Face class names of causal LMs (GPT2LMHeadModel, LlamaForCausalLM, PeftModelForCausalLM, ...).
LM_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
LM_SAMPLE_COLUMNS = ("perplexity", "n_target_tokens", "token_entropy_mean", "top1_miss_rate", "max_token_loss")
CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk of token_stats (128 MiB of float32)
TOKEN_COLUMNS = ("sample_id", "position", "token_id", "token", "is_target", "loss", "entropy", "top1")


def is_causal_lm_architecture(name: Any) -> bool:
    """Whether a Hugging Face architecture / class name is a causal LM's (``*ForCausalLM``, ``*LMHeadModel``)."""
    return isinstance(name, str) and name.endswith(LM_ARCHITECTURE_SUFFIXES)


@dataclass
class TokenStats:
    """Per-token statistics of a batch, on the CPU; ``(B, T)`` arrays indexed by padded position ``j`` (the
    token's own position: values at ``j`` come from the logits at ``j - 1``; column 0 has none)."""

    input_ids: np.ndarray  # (B, T) int64
    present: np.ndarray  # (B, T) bool: not padding
    target: np.ndarray  # (B, T) bool: in the loss (label != -100, j >= 1)
    token_loss: np.ndarray  # (B, T) float64 NLL of input_ids[j] (NaN at j = 0)
    label_loss: np.ndarray  # (B, T) float64 NLL of labels[j] where target (NaN elsewhere)
    entropy: np.ndarray  # (B, T) float64 nats (NaN at j = 0)
    top1: np.ndarray  # (B, T) bool: argmax of logits[j - 1] == input_ids[j] (False at j = 0)
    label_top1: np.ndarray  # (B, T) bool: argmax of logits[j - 1] == labels[j]


def token_stats(logits: torch.Tensor, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> TokenStats:
    """Per-token statistics of a batch from its ``(B, T, V)`` logits, its inputs (``input_ids`` needed,
    ``attention_mask`` optional) and ``(B, T)`` labels. Computed on the logits' device, one batch at a time."""
    if "input_ids" not in inputs:
        raise ValueError(
            f"a causal-LM scan needs 'input_ids' among the batch's inputs (got {sorted(inputs)}) to name each token."
        )
    ids = inputs["input_ids"]
    b, t = ids.shape
    v = int(logits.shape[-1])
    # A few samples at a time: the float32 log-probabilities and their exp are two more (rows, T, V) arrays, so
    # chunks of at most CHUNK_ELEMENTS keep the extra memory small next to the logits themselves.
    step = max(1, CHUNK_ELEMENTS // max(1, t * v))
    dev = logits.device
    ids_d, labels_d = ids.to(dev), labels.to(dev)  # once, not per chunk
    chunks: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for lo in range(0, b, step):
            x = logits[lo : lo + step, :-1].detach()  # (rows, T-1, V)
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            logp = F.log_softmax(x, dim=-1)  # (rows, T-1, V)
            nxt = ids_d[lo : lo + step, 1:]  # (rows, T-1) the tokens the logits predict
            gold = labels_d[lo : lo + step, 1:]  # (rows, T-1)
            # (rows, T-1); clamped like the labels below: an input id past the output vocabulary (a model whose
            # head is smaller than its embedding) must not fault the device
            tok = -logp.gather(2, nxt.clamp(0, v - 1).unsqueeze(2)).squeeze(2)
            # -100 read as id 0 and masked below; an id past the vocabulary (refused by the scan's label check,
            # read after this batch) clamped so the gather cannot fault the device first
            lab = -logp.gather(2, gold.clamp(0, v - 1).unsqueeze(2)).squeeze(2)
            ent = -(logp.exp() * logp).sum(dim=2)  # (rows, T-1)
            arg = logp.argmax(dim=2)  # (rows, T-1)
            chunks.append([tok, lab, ent, arg == nxt, arg == gold, gold != IGNORE_INDEX])
            del x, logp
        # Each statistic joined on the device, then every array copied to the host at once: one wait per batch,
        # not one per array and chunk (a chunk is one sample for a large vocabulary).
        cols = [torch.cat(c) for c in zip(*chunks)]  # each (B, T-1)
    mask = inputs.get("attention_mask")
    host, event = to_host_async([*cols, ids, *([] if mask is None else [mask])])
    if event is not None:
        event.synchronize()
    tok, lab, ent, top1, lab_top1, is_t = (h.numpy() for h in host[:6])  # each (B, T-1)
    ids_h = host[6].numpy()
    present = np.ones((b, t), dtype=bool) if mask is None else host[7].numpy() != 0

    def pad(a: np.ndarray, fill: Any) -> np.ndarray:
        return np.concatenate([np.full((b, 1), fill, dtype=a.dtype), a], axis=1)  # (B, T-1) -> (B, T)

    target = pad(is_t, False)
    after_pad = np.zeros((b, t), dtype=bool)
    after_pad[:, 1:] = present[:, 1:] & ~present[:, :-1]  # (B, T) a real token right after padding
    if (after_pad & target).any():
        i, j = (int(v[0]) for v in np.nonzero(after_pad & target))
        raise ValueError(
            f"sample at batch position {i}: the target token at index {j} follows padding, so it would be predicted "
            "from a pad position's logits (a left-padded batch); pad on the right (tokenizer.padding_side = "
            "'right', as hardmine.loaders.open_text does) or give that token the label -100."
        )
    return TokenStats(
        input_ids=ids_h.astype(np.int64),
        present=present,
        target=target,
        token_loss=pad(tok.astype(np.float64), np.nan),
        label_loss=np.where(target, pad(lab.astype(np.float64), np.nan), np.nan),
        entropy=pad(ent.astype(np.float64), np.nan),
        top1=pad(top1, False),
        label_top1=pad(lab_top1, False),
    )


def lm_sample_stats(ts: TokenStats) -> dict[str, np.ndarray]:
    """The per-sample LM columns (``LM_SAMPLE_COLUMNS``) over each sample's target tokens."""
    n = ts.target.sum(axis=1)  # (B,)
    safe = np.maximum(n, 1)
    nll = np.where(ts.target, ts.label_loss, 0.0)
    with np.errstate(over="ignore"):
        perplexity = np.exp(nll.sum(axis=1) / safe)
    return {
        "perplexity": np.where(n > 0, perplexity, np.nan),
        "n_target_tokens": n.astype(np.int64),
        "token_entropy_mean": np.where(n > 0, np.where(ts.target, ts.entropy, 0.0).sum(axis=1) / safe, np.nan),
        "top1_miss_rate": np.where(n > 0, (ts.target & ~ts.label_top1).sum(axis=1) / safe, np.nan),
        "max_token_loss": np.where(n > 0, np.where(ts.target, ts.label_loss, -np.inf).max(axis=1), np.nan),
    }


def token_schema(id_kind: str) -> pa.Schema:
    """The schema of ``tokens.parquet`` for integer (``"int"``) or string (``"str"``) sample ids."""
    return pa.schema([
        pa.field("sample_id", pa.int64() if id_kind == "int" else pa.string()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int64()),
        pa.field("token", pa.string()),
        pa.field("is_target", pa.bool_()),
        pa.field("loss", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("top1", pa.bool_()),
    ])


class TokenTable:
    """Builds the ``tokens.parquet`` rows of each batch. ``tokenizer``: decodes each token id (once per id:
    decoded strings are cached); ``None`` leaves the ``token`` column null."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._decoded: dict[int, str] = {}

    def _decode(self, ids: np.ndarray) -> pa.Array:
        if self.tokenizer is None:
            return pa.nulls(len(ids), type=pa.string())
        uniq, inverse = np.unique(ids, return_inverse=True)
        for v in uniq.tolist():
            if v not in self._decoded:
                self._decoded[v] = str(self.tokenizer.decode([v]))
        strings = np.array([self._decoded[v] for v in uniq.tolist()], dtype=object)
        return pa.array(strings[inverse].tolist(), type=pa.string())

    def rows(self, sample_ids: np.ndarray, ts: TokenStats) -> pa.Table:
        """The rows of one batch: every non-padding token of each sample, in sample then position order."""
        keep = ts.present  # (B, T)
        counts = keep.sum(axis=1)  # (B,)
        position = (np.cumsum(keep, axis=1) - 1)[keep].astype(np.int32)  # (rows,) index among real tokens
        prev = np.zeros_like(keep)
        prev[:, 1:] = keep[:, :-1]
        has_pred = prev[keep]  # (rows,) False for a sample's first real token: no real position precedes it
        ids = np.repeat(np.asarray(sample_ids), counts)
        kind = "int" if np.asarray(sample_ids).dtype.kind in "iu" else "str"
        token_id = ts.input_ids[keep]
        sid = pa.array(ids.astype(np.int64), pa.int64()) if kind == "int" else pa.array([str(v) for v in ids], pa.string())
        arrays = [
            sid,
            pa.array(position, pa.int32()),
            pa.array(token_id, pa.int64()),
            self._decode(token_id),
            pa.array(ts.target[keep], pa.bool_()),
            pa.array(ts.token_loss[keep].astype(np.float32), pa.float32(), mask=~has_pred),
            pa.array(ts.entropy[keep].astype(np.float32), pa.float32(), mask=~has_pred),
            pa.array(ts.top1[keep], pa.bool_(), mask=~has_pred),
        ]
        return pa.Table.from_arrays(arrays, schema=token_schema(kind))
