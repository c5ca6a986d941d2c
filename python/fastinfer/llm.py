"""Old home of `LLM`, kept importable (``fastinfer.LLM`` resolves through it): it lives in entrypoints/llm.py."""

from fastinfer.entrypoints.llm import LLM

__all__ = ["LLM"]
