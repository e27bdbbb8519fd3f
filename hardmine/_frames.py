"""Small pandas helpers shared by the stage modules that build the manifest frame (score, slices, manifest)."""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["set_column"]


def set_column(df: pd.DataFrame, name: str, values: Any) -> None:
    """``df[name] = values`` without copying a freshly computed array: pandas copies a bare numpy or extension
    array on assignment, a Series it shares. At a million rows each copy is 8 MB of new memory, and a scored
    manifest gains some twenty columns (new pages cost more than the copy itself on a small VM). ``values``
    must not be changed afterwards (the frame now reads it): pass only arrays the caller just made."""
    df[name] = pd.Series(values, index=df.index, copy=False)
