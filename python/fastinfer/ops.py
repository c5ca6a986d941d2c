"""Public ``fastinfer.ops``: the engine's low-level ops (implemented in ``fastinfer.kernels.ops``).

``reshape_and_cache`` (vLLM's cache write), ``pack_linear_weight`` and ``linear`` (packed CPU
projection, float or GGUF-quantised weights: ``QuantizedPacked``, ``QuantizedParts``, ``QUANT_TYPES``; ``dequantize_rows``
of a quantised one), ``rms_norm``,
``act_and_mul`` and ``rotary_embedding_`` (CPU decoder-layer ops).
"""

from fastinfer.kernels.ops import (QUANT_TYPES, QuantizedPacked, QuantizedParts, act_and_mul, dequantize_rows, linear,
                                   pack_linear_weight, reshape_and_cache, rms_norm, rotary_embedding_)

__all__ = ["reshape_and_cache", "pack_linear_weight", "linear", "QuantizedPacked", "QuantizedParts", "QUANT_TYPES",
           "dequantize_rows", "rms_norm", "act_and_mul", "rotary_embedding_"]
