"""Engine components (vLLM v1 design): settings, sequences, paged blocks with prefix caching, scheduler, sampler."""

from .config import SchedulerConfig
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__all__ = [
    "CompletionOutput",
    "LLMEngine",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
