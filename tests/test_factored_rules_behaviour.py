"""The factored layer rules and layout: behaviour the mutation run asked for."""

from __future__ import annotations
