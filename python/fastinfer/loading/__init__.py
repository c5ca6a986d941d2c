"""Checkpoint loading: Hugging Face folders (hf.py: safetensors, shard indexes, the local HF cache), GGUF files
(gguf_file.py: the container; gguf.py: its config and weights under Hugging Face names; gguf_tokenizer.py),
tokenizers and chat templates (tokenizer.py), bounded file reading (files.py), and ``load_model`` (load.py),
which puts them together into a built, filled model. What differs between architectures is read from
``fastinfer.models.registry``.

>>> from fastinfer.loading import load_model
>>> loaded = load_model("/path/to/hf_folder", dtype="bfloat16")   # doctest: +SKIP
>>> loaded.model, loaded.config, loaded.tokenizer, loaded.generation_config   # doctest: +SKIP
"""

from fastinfer.loading.files import LoadError
from fastinfer.loading.load import LoadedModel, default_model_path, load_model

__all__ = ["LoadError", "LoadedModel", "default_model_path", "load_model"]
