"""Loading what users have on disk: checkpoints/models (``model``) and datasets (``data``)."""

from .data import BatchSource, open_data
from .model import LoadedModel, load_model

__all__ = ["BatchSource", "LoadedModel", "load_model", "open_data"]
