"""Helpers of ``scripts/eval_quality.py``: data tasks, a small trainer, baselines, metrics and the report.

Kept out of the ``hardmine`` package on purpose: the benchmark uses hardmine's public API only, exactly as a
user would, and everything else it needs (tasks, baselines, metrics) lives here.
"""

__all__: list[str] = []
