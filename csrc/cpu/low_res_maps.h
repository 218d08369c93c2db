#pragma once

// CPU helpers shared by the scale_maps and fuse_maps kernels: a NaN-propagating (min, max)
// pair, one axis's bilinear taps, and the low-resolution half of one map (mm(relu(raw)) and its
// rows interpolated to the output width). The per-element math lives in fastxai/scale_maps.h.

#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "fastxai/scale_maps.h"

namespace fastxai {
namespace cpu {

template <typename T>
struct MinMax {
  T lo;
  T hi;

  static MinMax empty() {
    return {std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};
  }
  MinMax merged(MinMax other) const {
    return {nan_min(lo, other.lo), nan_max(hi, other.hi)};
  }
};

template <typename scalar_t>
std::vector<LinearTaps<scalar_t>> axis_taps(int64_t in_size, int64_t out_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t ratio = bilinear_ratio<acc_t>(in_size, out_size);
  std::vector<LinearTaps<scalar_t>> taps(out_size);
  for (int64_t dst = 0; dst < out_size; ++dst) {
    taps[dst] = bilinear_taps<scalar_t>(ratio, dst, in_size, out_size);
  }
  return taps;
}

// Low-resolution half of one map: `low` = mm(relu(raw)) (h, w), then `cols` (h, W): every row of
// `low` interpolated along x to the output width.
template <typename scalar_t>
void prepare_low_res(
    const scalar_t* raw,
    int64_t in_height,
    int64_t in_width,
    const std::vector<LinearTaps<scalar_t>>& x_taps,
    scalar_t* low,
    scalar_t* cols) {
  const int64_t in_pixels = in_height * in_width;
  MinMax<scalar_t> range{relu(raw[0]), relu(raw[0])};
  for (int64_t i = 1; i < in_pixels; ++i) {
    const scalar_t v = relu(raw[i]);
    range.lo = nan_min(range.lo, v);
    range.hi = nan_max(range.hi, v);
  }
  const scalar_t denominator = min_max_denominator(range.lo, range.hi);
  for (int64_t i = 0; i < in_pixels; ++i) {
    low[i] = min_max_scale(relu(raw[i]), range.lo, denominator);
  }
  const int64_t out_width = static_cast<int64_t>(x_taps.size());
  for (int64_t r = 0; r < in_height; ++r) {
    const scalar_t* low_row = low + r * in_width;
    scalar_t* cols_row = cols + r * out_width;
    for (int64_t x = 0; x < out_width; ++x) {
      const LinearTaps<scalar_t>& t = x_taps[x];
      cols_row[x] = blend(low_row[t.i0], low_row[t.i1], t.w0, t.w1);
    }
  }
}

}  // namespace cpu
}  // namespace fastxai
