// The op families of fastinfer._C: each file of csrc/bindings/ registers one family on the module
// (module.cpp calls them all). Inputs are checked there, once (checks.h); backends trust them.
#pragma once
#include <pybind11/pybind11.h>

namespace fastinfer::bindings {

void bind_attention(pybind11::module_& m);  // attention.cpp: AttentionOptions, attention_forward
void bind_backward(pybind11::module_& m);   // backward.cpp: attention_backward
void bind_kv_cache(pybind11::module_& m);   // kv_cache.cpp: reshape_and_cache, attention_with_kvcache
void bind_linear(pybind11::module_& m);     // linear.cpp: linear_pack, linear_packed_numel, linear
void bind_pointwise(pybind11::module_& m);  // pointwise.cpp: rms_norm, act_and_mul, rotary_embedding
void bind_decoder(pybind11::module_& m);    // decoder.cpp: CpuDecoderConfig, DecoderLayerWeights, CpuDecoder
void bind_cuda_device(pybind11::module_& m);  // cuda_device.cpp: cuda_arch_problem, cuda_device_problem

}  // namespace fastinfer::bindings
