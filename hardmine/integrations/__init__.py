"""Optional framework integrations, each a thin layer over :class:`hardmine.OnlineMiner`.

* :mod:`hardmine.integrations.lightning` -- a PyTorch Lightning ``Callback``
  (``pip install hardmine[lightning]``);
* :mod:`hardmine.integrations.hf` -- a Hugging Face ``transformers.Trainer`` subclass and ``TrainerCallback``
  (``pip install hardmine[hf]``).

The submodules import their framework on import; this package imports nothing, so ``import hardmine``
never needs them.
"""

from __future__ import annotations

__all__: list[str] = []
