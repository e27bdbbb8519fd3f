"""Turn a checkpoint on disk into an ``nn.Module``, safely.

Accepted forms:
- a state dict (``.pt``/``.pth``/``.bin``, loaded with ``torch.load(weights_only=True)``, or
  ``.safetensors``) plus ``factory="pkg.module:callable"`` that builds the architecture; a checkpoint that
  wraps the state dict (``{"model": ...}``, ``{"state_dict": ...}``, Lightning's ``model.`` prefix) is unwrapped
  with ``state_key`` or detected;
- a ``torch.export`` archive (``.pt2``): no factory needed;
- a local Hugging Face model directory (``config.json``), with the ``[hf]`` extra, loaded as a causal LM
  (``AutoModelForCausalLM``) when ``task="causal-lm"`` or, with the default ``task=None``, when its config's
  ``architectures`` name one (``*ForCausalLM`` / ``*LMHeadModel``), else as a sequence classifier. A causal LM
  without a tokenizer in its directory loads with ``tokenizer=None`` (text data then refuses it clearly). A directory whose classification head is not in the checkpoint (e.g. a base or sentence-embedding
  model) would get a *random* head: refused unless ``allow_new_head=True``, and then the head is initialised
  from a fixed seed (``NEW_HEAD_SEED``) so two runs give the same model and fingerprint. ``num_labels`` sizes
  a new head; for a trained head it must match (a trained head is never resized);
- a PEFT adapter directory (``adapter_config.json``, e.g. LoRA; ``peft`` in the ``[hf]`` extra): its base
  model (a local directory, ``base_model_name_or_path``, loaded as above) plus the adapter, with the
  adapter's parameters trainable and the base frozen, so a scan's default selection (every trainable
  parameter) is the adapter alone (LoRA A/B are ``nn.Linear``: the factored engine covers them);
- a fully pickled model only with ``unsafe_pickle=True`` (unpickling runs arbitrary code).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import model_fingerprint
from ..lm import is_causal_lm_architecture

__all__ = ["NEW_HEAD_SEED", "LoadedModel", "load_model", "import_object", "state_dict_fingerprint", "unwrap_state_dict"]

logger = logging.getLogger(__name__)

_STATE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
NEW_HEAD_SEED = 0  # the seed a newly initialised Hugging Face head is drawn from (allow_new_head=True)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
_PREFIXES = ("model.", "module.", "net.", "_orig_mod.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "state_dict" | "export" | "hf" | "peft" | "pickle"
    fingerprint: str  # model_fingerprint(model): the value a scan of this model records
    tokenizer: Any = None  # HF tokenizer when kind == "hf"
    info: dict[str, Any] = field(default_factory=dict)


def import_object(spec: str, what: str = "factory") -> Any:
    """Import ``pkg.module:attr`` (the CLI puts the working directory on ``sys.path``, like ``python -m``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'.")
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} for {what} {spec!r}: {exc}") from exc
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (from {what} {spec!r}).")
        obj = getattr(obj, part)
    return obj


def state_dict_fingerprint(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """``hardmine._io.model_fingerprint``: the one model fingerprint (the value scans record), kept under
    this name for existing imports. Same weights -> same hash."""
    return model_fingerprint(state)


def unwrap_state_dict(obj: Any, state_key: str | None = None) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint and strip wrapper prefixes."""
    if state_key is not None:
        if not isinstance(obj, Mapping) or state_key not in obj:
            keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"--state-key {state_key!r} is not in the checkpoint; its top-level keys are {keys}.")
        obj = obj[state_key]
    elif isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping) and _is_tensor_dict(obj[key]):
                logger.info("using checkpoint[%r] as the state dict", key)
                obj = obj[key]
                break
        else:
            raise ValueError(
                f"the checkpoint is a dict with keys {sorted(obj)[:20]} but none holds a state dict of tensors; "
                "pass --state-key NAME to say which entry is the model's state dict."
            )
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state dict of tensors.")
    return dict(obj)


def _is_tensor_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _match_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    if set(state) & expected:
        return state
    for prefix in _PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and set(stripped) & expected:
            logger.info("stripped prefix %r from checkpoint keys", prefix)
            return stripped
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    state = _match_prefix(state, set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes[:10])}]")
        raise ValueError(
            f"checkpoint {path} does not match the model built by the factory: {', '.join(parts)}. Check that "
            "--model builds the same architecture (and --state-key if the checkpoint wraps the weights)."
        )
    model.load_state_dict(state, strict=True)


def _torch_load(path: Path, unsafe_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler names the class it refused ("Unsupported global"); anything else is
        # a file that is not a checkpoint at all.
        if "global" not in str(exc).lower():
            raise ValueError(f"{path} could not be read as a torch checkpoint: {str(exc).splitlines()[0]}") from exc
        if not unsafe_pickle:
            raise ValueError(
                f"{path} is not a plain state dict: it contains pickled Python objects (e.g. a whole saved model), "
                "and unpickling can run arbitrary code, so hardmine refuses it by default. Save "
                "model.state_dict() and pass --model pkg.module:factory, or, if you trust the file, pass "
                f"--unsafe-pickle. (torch said: {str(exc).splitlines()[0]})"
            ) from exc
        logger.warning("unpickling %s with weights_only=False because --unsafe-pickle was given", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} could not be read as a torch checkpoint: {exc}") from exc


def load_model(
    path: str | os.PathLike[str],
    factory: str | None = None,
    *,
    state_key: str | None = None,
    unsafe_pickle: bool = False,
    num_labels: int | None = None,
    allow_new_head: bool = False,
    task: str | None = None,
) -> LoadedModel:
    """Load a model from ``path`` (see the module docstring for the accepted forms). ``task``: a ``TaskKind``
    value or ``None``/``"auto"``; only Hugging Face directories use it (``"causal-lm"``: load an LM head)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist.")
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            if factory is not None:
                raise ValueError(f"--model {factory!r} was given, but {path} is a PEFT adapter directory; drop --model.")
            return _load_peft(path, num_labels, allow_new_head, task)
        if (path / "config.json").exists():
            if factory is not None:
                raise ValueError(
                    f"--model {factory!r} was given, but {path} is a Hugging Face model directory, which brings its "
                    "own architecture (config.json); drop --model."
                )
            return _load_hf(path, num_labels, allow_new_head, task)
        raise ValueError(f"{path} is a directory without config.json; pass a checkpoint file or a Hugging Face model dir.")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        try:
            prog = torch.export.load(str(path))
        except Exception as exc:
            raise ValueError(f"{path} could not be loaded as a torch.export archive: {exc}") from exc
        model = prog.module()
        return LoadedModel(model, "export", model_fingerprint(model), info={"format": "torch.export"})
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise ValueError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from exc
        obj: Any = load_file(str(path))
    elif suffix in _STATE_SUFFIXES:
        obj = _torch_load(path, unsafe_pickle)
    else:
        raise ValueError(
            f"checkpoint {path.name!r} has an unknown extension {suffix!r}; use .pt/.pth/.bin/.ckpt (state dict), "
            ".safetensors, .pt2 (torch.export) or a Hugging Face model directory."
        )
    if isinstance(obj, nn.Module):  # only reachable with unsafe_pickle=True
        return LoadedModel(obj, "pickle", model_fingerprint(obj), info={"format": "pickle"})
    if factory is None:
        raise ValueError(
            f"{path} holds only weights; pass --model pkg.module:factory to build the architecture they belong to."
        )
    state = unwrap_state_dict(obj, state_key)
    build = import_object(factory, "--model")
    if not callable(build):
        raise ValueError(f"--model {factory!r} is not callable.")
    model = build()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {factory!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    _load_into(model, state, path)
    return LoadedModel(model, "state_dict", model_fingerprint(model), info={"format": suffix.lstrip(".")})


def _load_hf(path: Path, num_labels: int | None, allow_new_head: bool, task: str | None = None) -> LoadedModel:
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as exc:
        raise ValueError(
            f"{path} is a Hugging Face model directory; reading it needs the [hf] extra: pip install 'hardmine[hf]'."
        ) from exc
    task = str(getattr(task, "value", task)) if task is not None else None
    if task is None or task == "auto":
        try:
            archs = AutoConfig.from_pretrained(str(path), local_files_only=True).architectures or []
        except Exception as exc:
            raise ValueError(f"could not read the Hugging Face config in {path}: {exc}") from exc
        task = "causal-lm" if any(is_causal_lm_architecture(a) for a in archs) else None
    if task == "causal-lm":
        return _load_hf_causal_lm(path, AutoTokenizer)

    def build(**kwargs: Any) -> tuple[nn.Module, set[str]]:
        # Seeded in a forked RNG: a head the checkpoint lacks is the same on every run, and the caller's
        # random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NEW_HEAD_SEED)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True, **kwargs
            )
        return model, set(info.get("missing_keys", ())) | set(info.get("mismatched_keys", ()))

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        model, missing = build()
        new_head = bool(missing)
        if new_head and num_labels is not None and num_labels != model.config.num_labels:
            model, missing = build(num_labels=num_labels)  # a new head: --num-classes sizes it
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"could not load the Hugging Face model in {path}: {exc}") from exc
    if new_head and not allow_new_head:
        raise ValueError(
            f"{path} has no trained classification head: {sorted(missing)[:4]} are missing from the checkpoint and "
            "would be initialised at random, so every score would describe a random classifier. Scan a fine-tuned "
            "model, or pass --allow-new-head (allow_new_head=True) to scan it with a new head drawn from a fixed "
            "seed (recorded in the scan)."
        )
    if not new_head and num_labels is not None and num_labels != model.config.num_labels:
        raise ValueError(
            f"--num-classes {num_labels} does not match the trained head of {path}, which has "
            f"{model.config.num_labels} classes ({getattr(config, 'id2label', None)}); --num-classes checks labels "
            "and never resizes a trained head."
        )
    info = {"format": "hf", "new_head": new_head}
    if new_head:
        info.update(new_head_seed=NEW_HEAD_SEED, new_head_params=sorted(missing))
    return LoadedModel(model, "hf", model_fingerprint(model), tokenizer=tokenizer, info=info)


def _load_hf_causal_lm(path: Path, auto_tokenizer: Any) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as exc:
        raise ValueError(f"could not load the Hugging Face causal LM in {path}: {exc}") from exc
    missing = sorted(set(info.get("missing_keys", ())) | set(info.get("mismatched_keys", ())))
    if missing:
        raise ValueError(
            f"{path} does not hold a complete causal LM: {missing[:4]} are missing from the checkpoint and would be "
            "random; scan a trained causal LM."
        )
    tokenizer = None
    # Only a directory with tokenizer files: without them, transformers builds an empty tokenizer of the model
    # type (no vocabulary), which would tokenise every text to nothing.
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = auto_tokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - text data refuses a missing tokenizer with its own message
            logger.warning("the tokenizer in %s could not be loaded: %s", path, exc)
    return LoadedModel(model, "hf", model_fingerprint(model), tokenizer=tokenizer,
                       info={"format": "hf", "new_head": False, "head": "causal-lm"})


def _load_peft(path: Path, num_labels: int | None, allow_new_head: bool, task: str | None = None) -> LoadedModel:
    import json

    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ValueError(
            f"{path} is a PEFT adapter directory; reading it needs the [hf] extra: pip install 'hardmine[hf]'."
        ) from exc
    try:
        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path / 'adapter_config.json'} is not readable JSON ({exc}).") from None
    base_dir = Path(str(base_name)) if base_name else None
    if base_dir is not None and not base_dir.is_absolute():
        base_dir = (path / base_dir) if (path / base_dir).is_dir() else base_dir
    if base_dir is None or not (base_dir / "config.json").is_file():
        raise ValueError(
            f"the adapter in {path} is for base model {base_name!r}, which is not a local Hugging Face model "
            "directory (nothing is downloaded); set base_model_name_or_path in adapter_config.json to its folder."
        )
    base = _load_hf(base_dir, num_labels, allow_new_head, task)
    try:
        model = PeftModel.from_pretrained(base.model, str(path), is_trainable=True)
    except Exception as exc:
        raise ValueError(f"could not load the PEFT adapter in {path} onto {base_dir}: {exc}") from exc
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    info = {**base.info, "format": "peft", "base_model": str(base_dir), "adapter_params": len(trainable)}
    return LoadedModel(model, "peft", model_fingerprint(model), tokenizer=base.tokenizer, info=info)
