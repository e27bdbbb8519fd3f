"""manifest.py behaviour the mutation run asked for: weights, caps, temperatures, strategies, metadata, errors."""

from __future__ import annotations
