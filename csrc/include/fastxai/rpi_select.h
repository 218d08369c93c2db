#pragma once

// Shared math of fastxai::rpi_select: the relative probability increase of every threshold of the
// TFT ladder and the first threshold that maximises it (TFT paper, Alg. 1 and Eqs. 4-7).
//
//   p_t   = softmax(logits_t)[c] = exp(l_c - m) / sum_j exp(l_j - m),   m = max_j l_j
//   rpi_t = max(p_t - p0, 0) / p0
//   index = first argmax_t rpi_t (NaN counts as the maximum, like torch.argmax),
//           or -1 when that maximum is not positive: no threshold raised the probability.

#include <cstdint>

#include "fastxai/macros.h"
#include "fastxai/scale_maps.h"

namespace fastxai {

// max(p - p0, 0) / p0, keeping NaN like Tensor.clamp_min(0).
template <typename T>
FASTXAI_HD inline T relative_probability_increase(T probability, T original) {
  return relu(probability - original) / original;
}

// Whether `candidate`, seen after `best`, becomes the first maximum: strictly greater, or the
// first NaN.
template <typename T>
FASTXAI_HD inline bool replaces_maximum(T candidate, T best) {
  return candidate > best || (candidate != candidate && best == best);
}

// The selected threshold: the first argmax when its RPI is positive, else -1 (no muting).
template <typename T>
FASTXAI_HD inline int64_t selected_index(int64_t first_argmax, T best) {
  return best > T(0) ? first_argmax : int64_t{-1};
}

}  // namespace fastxai
