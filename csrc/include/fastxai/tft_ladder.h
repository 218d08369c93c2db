#pragma once

// Shared math of fastxai::tft_ladder and fastxai::tft_mask: the mask of one threshold of the TFT
// ladder at one pixel, and the weight that multiplies the image there.
//
//   value mode:       keep = (I >= tau) & (I > 0)
//   percentile mode:  keep = rank(I) >= floor(q * H * W), rank = position in the stable ascending
//                     sort of the map (torch.sort(stable=True): NaN last, ties in pixel order)
//   binary mask:      weight = keep          soft mask:  weight = keep * I
//   masked image:     out = weight * x
//
// The percentile rank is not computed per pixel: for each (image, threshold) the backends find the
// pixel of stable rank k = floor(q * H * W), the pivot, and a pixel is kept when its (value, index)
// key does not sort before the pivot's. k = H * W (everything muted) has no pivot pixel; it is
// encoded as the key (NaN, H * W), which no pixel reaches.

#include <cmath>
#include <cstdint>

#include "fastxai/macros.h"

namespace fastxai {

// Value mode keeps I >= tau among the positive pixels (TFT paper, Alg. 1: at tau = 0 the mask is 1[I > 0]).
// A non-short-circuit `&` keeps CPU loops free of branches, so they vectorise.
template <typename T>
FASTXAI_HD inline bool value_keeps(T value, T tau) {
  return (value >= tau) & (value > T(0));
}

// The number of pixels percentile mode mutes: floor(q * pixels) in double precision, as the
// reference computes it, clamped to [0, pixels].
FASTXAI_HD inline int64_t muted_count(double fraction, int64_t pixels) {
  const double muted = ::floor(fraction * static_cast<double>(pixels));
  if (!(muted > 0.0)) {
    return 0;  // also NaN
  }
  return muted >= static_cast<double>(pixels) ? pixels : static_cast<int64_t>(muted);
}

// Strict order of torch.sort(stable=True) ascending on (value, pixel index): NaN after every
// number, equal values (-0 == +0 included) and NaNs among themselves in pixel order. Comparisons
// with a NaN are false, so the first two terms cover two numbers and the last a NaN `b`.
// Index is any signed integer type: the CPU kernel passes block-local 32-bit indices, which
// vectorise.
template <typename T, typename Index>
FASTXAI_HD inline bool sorts_before(T a, Index a_index, T b, Index b_index) {
  const bool earlier = a_index < b_index;
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  return (a < b) | ((a == b) & earlier) | (b_nan & (!a_nan | earlier));
}

// Percentile mode keeps a pixel unless it sorts before the pivot of its (image, threshold).
template <typename T, typename Index>
FASTXAI_HD inline bool rank_keeps(T value, Index index, T pivot_value, Index pivot_index) {
  return !sorts_before(value, index, pivot_value, pivot_index);
}

// The weight from the binary mask value (1 or 0): binary, or binary * I (soft), multiplied rather
// than selected to round like the reference's mask.to(dtype) * map.
template <typename T>
FASTXAI_HD inline T keep_weight(T binary, T value, bool soft) {
  return soft ? binary * value : binary;
}

template <typename T>
FASTXAI_HD inline T mask_weight(bool keep, T value, bool soft) {
  return keep_weight(static_cast<T>(keep), value, soft);
}

}  // namespace fastxai
