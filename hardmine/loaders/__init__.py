"""Loading what users have on disk: checkpoints/models (``model``) and datasets (``data``)."""

from .data import BatchSource, open_data
from .model import LoadedModel, load_model
from .text import TextSource, open_text

__all__ = ["BatchSource", "LoadedModel", "TextSource", "load_model", "open_data", "open_text"]
