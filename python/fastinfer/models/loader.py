"""Old home of ``load_model``, kept importable while callers move to ``fastinfer.loading``."""

from fastinfer.loading.files import LoadError
from fastinfer.loading.hf import resolve_hf_cache
from fastinfer.loading.load import DTYPES, LoadedModel, default_model_path, load_model

__all__ = ["DTYPES", "LoadError", "LoadedModel", "default_model_path", "load_model", "resolve_hf_cache"]
