"""Export defaults shared by the API and the CLI. A module with no heavy imports, so the command line can
read its option defaults without loading numpy or torch (``hardmine --help`` starts fast)."""

from __future__ import annotations

__all__ = ["DEFAULT_BOOST", "DEFAULT_CAP", "DEFAULT_SLICE_BOOST", "DEFAULT_TEMPERATURE", "DEFAULT_TOP"]

DEFAULT_TOP = 0.1  # hardest 10% are `is_hard`
DEFAULT_BOOST = 5.0  # top-k: a hard sample is drawn 5x as often as an easy one (before the cap)
DEFAULT_TEMPERATURE = 1.0
# slices: weight 1 + slice_boost * (slice error rate / class error rate). 0.5 is the gentlest of the boosts the
# quality benchmark tried (5, 2, 1, 0.5) and the one its strategy rule chose over both datasets: the stronger
# ones gain more worst sub-class accuracy but cost more than 2 points of accuracy under label noise.
DEFAULT_SLICE_BOOST = 0.5
DEFAULT_CAP = 20.0  # no sample's weight exceeds 20x the mean weight
