"""Engine components (vLLM v1 design): settings, sequences, paged blocks with prefix caching, scheduler, sampler.

The settings and output types import without torch (the CLI checks requests before anything loads); ``LLMEngine``
and the components that run the model are imported on first use."""

from .cache_config import CacheConfig, KVCacheSpec
from .config import SchedulerConfig
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .structured_outputs import StructuredOutputsParams

__all__ = [
    "CacheConfig",
    "CompletionOutput",
    "KVCacheSpec",
    "LLMEngine",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "StructuredOutputsParams",
]


def __getattr__(name: str):
    if name == "LLMEngine":  # imports torch
        from .llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'fastinfer.engine' has no attribute {name!r}")
