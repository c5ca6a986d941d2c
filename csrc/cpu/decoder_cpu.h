#pragma once
#include "fastinfer/decoder.h"

namespace fastinfer::cpu {

// Runs every layer and the final norm of one step (see decoder.h); writes the layers' keys
// and values into their caches.
void decoder_forward(const DecoderConfig& c, const DecoderStep& s);

}  // namespace fastinfer::cpu
