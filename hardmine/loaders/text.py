"""Text data for causal-LM scans: JSONL, CSV or Parquet rows -> tokenised ``(inputs, labels, sample_ids)`` batches.

Exactly one way of saying what the model should predict:

* ``text_column``: the whole text is the target (loss on every token after the first);
* ``prompt_column`` + ``completion_column``: ``prompt`` tokens (with the tokenizer's special tokens) then
  ``completion`` tokens and the end-of-sequence token; only the completion (and that end token) is a target:
  the prompt's labels are ``-100``, so prompt tokens never enter the loss or the gradient;
* ``messages_column``: a conversation, a list of ``{"role", "content"}`` (in CSV: its JSON text), rendered
  with the tokenizer's chat template; only the assistant turns are targets. Their token spans are found by
  rendering the conversation's prefixes one message at a time: the tokens added by an assistant message
  (after the template's generation prompt, i.e. its header) are its span, so the spans are exact for any
  template whose renderings of prefixes are prefixes of the whole (checked; refused otherwise).

Every sample is cut to ``max_length`` tokens (from the end: the prompt and early turns are kept); the number
of cut samples is logged and reported (``TextSource.report()``, which ``hardmine.scan`` records in
``scan.json`` under ``data``). Batches are padded on the right with the tokenizer's pad token — its
end-of-sequence token when it has none (padding is masked out by ``attention_mask`` and ``-100`` labels, so
the choice changes nothing) — and the tokenizer object is never modified.

Refused with a ``ValueError`` naming the sample: a missing column, a text that is not a string, an empty
completion (before or after truncation), a conversation without an assistant turn (or whose assistant tokens
were all cut), a sample without any target token, a tokenizer without a chat template (``messages_column``)
or without pad and end-of-sequence tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..enums import DataFormat, parse_choice
from ..losses import IGNORE_INDEX
from .data import BatchSource, detect_format, row_groups_for

__all__ = ["DEFAULT_MAX_LENGTH", "TextSource", "open_text"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512  # tokens per sample; longer samples are cut (and counted)

Encoded = tuple[list[int], list[int]]  # (input ids, labels) of one sample


@dataclass
class _Counts:
    samples: int = 0
    truncated: int = 0
    target_tokens: int = 0


@dataclass
class TextSource(BatchSource):
    """A ``BatchSource`` of tokenised text, with its tokenizer (``hardmine.scan`` decodes ``tokens.parquet``'s
    ``token`` column with it) and ``report()``, what the last pass over it counted."""

    tokenizer: Any = None
    max_length: int = DEFAULT_MAX_LENGTH
    mode: str = "text"
    counts: _Counts = field(default_factory=_Counts)

    def rows(self, start: int, stop: int) -> TextSource:
        """The rows ``[start, stop)`` (a distributed scan's part), still a ``TextSource`` with its tokenizer."""
        part = super().rows(start, stop)
        return TextSource(part.format, part.total, part._make_iter, part.description, tokenizer=self.tokenizer,
                          max_length=self.max_length, mode=self.mode, counts=self.counts)

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_length": self.max_length, "samples": self.counts.samples,
                "truncated": self.counts.truncated, "target_tokens": self.counts.target_tokens}


# ------------------------------------------------------------------------------------------ encoding
class _Encoder:
    def __init__(self, tokenizer: Any, mode: str, max_length: int) -> None:
        self.tok = tokenizer
        self.mode = mode
        self.max_length = max_length
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def encode(self, row: dict[str, Any], sid: Any, counts: _Counts) -> Encoded:
        if self.mode == "text":
            ids = self.ids(_text(row["text"], "text", sid), True)
            labels = list(ids)
        elif self.mode == "prompt":
            prompt = self.ids(_text(row["prompt"], "prompt", sid), True)
            completion_text = _text(row["completion"], "completion", sid)
            completion = self.ids(completion_text, False) if completion_text else []
            if not completion:
                raise ValueError(f"the completion of sample {sid!r} is empty; every sample needs a completion to score.")
            if self.eos is not None:
                completion = completion + [self.eos]  # the model is also scored on ending the completion
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids, labels = self.conversation(row["messages"], sid)
        if len(ids) > self.max_length:
            counts.truncated += 1
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if self.mode == "prompt" and all(v == IGNORE_INDEX for v in labels):
                raise ValueError(
                    f"the completion of sample {sid!r} is empty after truncation to max_length={self.max_length} "
                    "tokens (its prompt fills them); raise --max-length or shorten the prompt."
                )
            if self.mode == "messages" and all(v == IGNORE_INDEX for v in labels):
                raise ValueError(
                    f"no assistant token of sample {sid!r} is left after truncation to max_length={self.max_length} "
                    "tokens; raise --max-length or shorten the earlier turns."
                )
        if all(v == IGNORE_INDEX for v in labels[1:]):
            raise ValueError(
                f"sample {sid!r} has no target token after its first ({len(ids)} token(s)); the first token is never "
                "predicted, so give it a longer text."
            )
        counts.target_tokens += sum(v != IGNORE_INDEX for v in labels[1:])
        return ids, labels

    def conversation(self, raw: Any, sid: Any) -> Encoded:
        messages = _messages(raw, sid)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(
                f"the conversation of sample {sid!r} has no assistant turn (roles {[m['role'] for m in messages]}); "
                "only assistant turns are scored."
            )
        ids: list[int] = []
        labels: list[int] = []

        def refuse(i: int) -> ValueError:
            return ValueError(
                f"the chat template renders the first {i + 1} message(s) of sample {sid!r} differently from the "
                "start of the whole conversation, so the assistant turns cannot be located; use "
                "--prompt-column/--completion-column instead."
            )

        for i, m in enumerate(messages):
            # Tokens before message i (with the assistant header when it is one), then through message i.
            start = self.render(messages[:i], m["role"] == "assistant") if i or m["role"] == "assistant" else []
            end = self.render(messages[: i + 1], False)
            if start[: len(ids)] != ids:
                raise refuse(i)
            head = start[len(ids):]
            ids += head
            labels += [IGNORE_INDEX] * len(head)
            # The generation prompt must be what the history renders before the turn, or the body is cut wrongly.
            if end[: len(ids)] != ids:
                raise refuse(i)
            body = end[len(ids):]
            ids += body
            labels += list(body) if m["role"] == "assistant" else [IGNORE_INDEX] * len(body)
        if ids != self.render(messages, False):  # the scanned tokens are exactly the template's conversation
            raise refuse(len(messages) - 1)
        return ids, labels

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        if not messages and not generation_prompt:
            return []
        out = self.tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        )
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(v) for v in out]


def _text(value: Any, what: str, sid: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"the {what} of sample {sid!r} is {value!r}, not text.")
    return value


def _messages(raw: Any, sid: Any) -> list[dict[str, str]]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the messages of sample {sid!r} are not valid JSON ({exc}).") from None
    if isinstance(raw, np.ndarray):
        raw = raw.tolist()
    ok = isinstance(raw, (list, tuple)) and raw and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in raw
    )
    if not ok:
        raise ValueError(
            f"the messages of sample {sid!r} must be a non-empty list of {{'role': str, 'content': str}}, got "
            f"{str(raw)[:120]!r}."
        )
    return [{"role": m["role"], "content": m["content"]} for m in raw]


# ------------------------------------------------------------------------------------------- reading
def _rows(
    path: Path, fmt: DataFormat, columns: Sequence[str], batch_size: int, start: int = 0, stop: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Rows ``[start, stop)`` of ``columns`` in file order, ``batch_size`` at a time (streamed: never the whole
    file; rows before ``start`` are skipped unparsed in JSONL and unread in Parquet row groups before it)."""
    pos, pending = start, []
    for chunk_start, chunk in _chunks(path, fmt, columns, batch_size, start, stop):
        lo = max(start - chunk_start, 0)
        hi = len(chunk) if stop is None else min(len(chunk), stop - chunk_start)
        if hi > lo:
            pending += chunk[lo:hi]
        pos = chunk_start + len(chunk)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
        if stop is not None and pos >= stop:
            break
    if pending:
        yield pending


def _chunks(
    path: Path, fmt: DataFormat, columns: Sequence[str], batch_size: int, start: int, stop: int | None
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(row index of the first row, rows)`` chunks of the file from at or before row ``start``."""
    if fmt is DataFormat.JSONL:
        batch: list[dict[str, Any]] = []
        row = first = -1
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row += 1
                if row < start:
                    continue  # another part's row (a distributed scan): not parsed
                if stop is not None and row >= stop:
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({exc}).") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}, line {line_no}: a JSON object per line is needed, got {type(rec).__name__}.")
                missing = [c for c in columns if c not in rec]
                if missing:
                    raise ValueError(
                        f"{path}, line {line_no}: {missing[0]!r} is not a column of this record (it has "
                        f"{sorted(rec)[:20]}); check --text-column / --prompt-column / --completion-column / "
                        "--messages-column / --id-column."
                    )
                if not batch:
                    first = row
                batch.append({c: rec[c] for c in columns})
                if len(batch) == batch_size:
                    yield first, batch
                    batch = []
        if batch:
            yield first, batch
        return
    if fmt is DataFormat.PARQUET:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        end = pf.metadata.num_rows if stop is None else stop
        groups, pos = row_groups_for(pf.metadata, start, end)  # only the row groups that hold the rows
        for rb in pf.iter_batches(batch_size=batch_size, columns=list(columns), row_groups=groups):
            yield pos, rb.to_pylist()
            pos += rb.num_rows
        return
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # CSV: every requested column read as text (ids too), so "007" stays "007" and a conversation is its JSON.
    # Parsed from the top (quoted newlines make a byte offset unknowable), converted to rows as it goes.
    opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=list(columns))
    pos = 0
    for rb in pacsv.open_csv(path, convert_options=opts):
        n = rb.num_rows
        if pos + n > start:
            yield pos, rb.to_pylist()
        pos += n
        if stop is not None and pos >= stop:
            break


def _columns_of(path: Path, fmt: DataFormat) -> list[str] | None:
    """The file's column names (``None`` for JSONL: checked line by line)."""
    try:
        if fmt is DataFormat.PARQUET:
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        if fmt is DataFormat.CSV:
            import pyarrow.csv as pacsv

            return list(pacsv.open_csv(path).schema.names)
    except Exception as exc:  # noqa: BLE001 - any reader error is a bad file
        raise ValueError(f"{path} is not a readable {fmt.value} file: {exc}") from exc
    return None


def _count_rows(path: Path, fmt: DataFormat) -> int | None:
    if fmt is DataFormat.PARQUET:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if fmt is DataFormat.JSONL:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    # CSV: quoted newlines make a line count wrong; a streamed parse of one column counts the records.
    import pyarrow.csv as pacsv

    first = pacsv.open_csv(path).schema.names[:1]
    reader = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(include_columns=first))
    return sum(batch.num_rows for batch in reader)


def _pad(encoded: list[Encoded], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    t = max(len(ids) for ids, _ in encoded)
    b = len(encoded)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)  # (B, T), right padding
    labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    mask = np.zeros((b, t), dtype=np.int64)  # (B, T)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
        mask[i, : len(ids)] = 1
    return ({"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)},
            torch.from_numpy(labels))


# ---------------------------------------------------------------------------------------------- entry
def open_text(
    data: str,
    tokenizer: Any,
    *,
    format: DataFormat | str = DataFormat.AUTO,
    text_column: str | None = None,
    prompt_column: str | None = None,
    completion_column: str | None = None,
    messages_column: str | None = None,
    id_column: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    limit: int | None = None,
) -> TextSource:
    """Open a JSONL/CSV/Parquet file of text as causal-LM batches ``({"input_ids", "attention_mask"}, labels,
    sample_ids)`` for ``hardmine.scan`` (see the module docstring for the three ways of marking targets)."""
    fmt = parse_choice(DataFormat, format, "format")
    if fmt is DataFormat.AUTO:
        fmt = detect_format(str(data))
    if fmt not in (DataFormat.JSONL, DataFormat.CSV, DataFormat.PARQUET):
        raise ValueError(f"causal-LM text data must be JSONL, CSV or Parquet; {str(data)!r} is {fmt.value}.")
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data {str(data)!r} does not exist or is not a file.")
    for name, v in (("batch size", batch_size), ("max_length", max_length)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} {v!r} must be a positive integer.")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no token to predict; use at least 2.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit {limit!r} must be a positive integer.")
    mode, source_columns = _mode(text_column, prompt_column, completion_column, messages_column)
    if tokenizer is None:
        raise ValueError(
            "causal-LM text data needs the model's tokenizer: save it next to the model (tokenizer.save_pretrained "
            "into the model directory) and pass that directory as CHECKPOINT."
        )
    if mode == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--messages-column {messages_column!r} needs a tokenizer with a chat template, and this one has none; "
            "set tokenizer.chat_template and save it, or use --prompt-column/--completion-column."
        )
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)  # documented: eos pads a tokenizer without a pad token
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad batches with; set one.")
    read = list(source_columns.values()) + ([id_column] if id_column else [])
    names = _columns_of(path, fmt)
    if names is not None:
        flags = {**{v: f"--{k}-column" for k, v in source_columns.items()}, **({id_column: "--id-column"} if id_column else {})}
        for col in read:
            if col not in names:
                raise ValueError(f"{flags[col]} {col!r} is not a column of {path.name}; its columns are {names[:30]}.")
    total = _count_rows(path, fmt)
    total = min(total, limit) if total is not None and limit is not None else total
    if total == 0:
        raise ValueError(f"data {str(data)!r} has no samples; nothing to scan.")
    encoder = _Encoder(tokenizer, mode, max_length)
    counts = _Counts()

    def it(start: int = 0, stop: int | None = None) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, list[Any]]]:
        counts.samples = counts.truncated = counts.target_tokens = 0  # each pass counts afresh
        seen = start  # default ids: positions in the whole file, also for a distributed scan's part
        for rows in _rows(path, fmt, read, batch_size, start, stop):
            if limit is not None:
                rows = rows[: limit - seen]
            ids = [r[id_column] for r in rows] if id_column else list(range(seen, seen + len(rows)))
            if id_column and any(v is None for v in ids):
                raise ValueError(f"--id-column {id_column!r} has missing values (near row {seen}).")
            encoded = [encoder.encode({k: r[c] for k, c in source_columns.items()}, sid, counts)
                       for r, sid in zip(rows, ids)]
            counts.samples += len(rows)
            seen += len(rows)
            inputs, labels = _pad(encoded, int(pad_id))
            yield inputs, labels, ids
            if limit is not None and seen >= limit:
                break
        if counts.truncated:
            logger.warning(
                "%d of %d samples were longer than max_length=%d tokens and were cut to it",
                counts.truncated, counts.samples, max_length,
            )

    desc = {"path": str(path), "columns": read, "mode": mode, "text_column": text_column, "prompt_column": prompt_column,
            "completion_column": completion_column, "messages_column": messages_column}
    return TextSource(fmt, total, it, desc, it if total is not None else None, tokenizer=tokenizer,
                      max_length=max_length, mode=mode, counts=counts)


def _mode(text: str | None, prompt: str | None, completion: str | None, messages: str | None) -> tuple[str, dict[str, str]]:
    if (prompt is None) != (completion is None):
        raise ValueError("--prompt-column and --completion-column go together: give both, or neither.")
    chosen = [m for m, on in (("text", text), ("prompt", prompt), ("messages", messages)) if on]
    if len(chosen) != 1:
        raise ValueError(
            "say what the language model should predict with exactly one of --text-column COL (every token), "
            "--prompt-column COL with --completion-column COL (the completion only) or --messages-column COL (the "
            "assistant turns of a conversation)."
        )
    mode = chosen[0]
    if mode == "text":
        return mode, {"text": str(text)}
    if mode == "prompt":
        return mode, {"prompt": str(prompt), "completion": str(completion)}
    return mode, {"messages": str(messages)}
