#pragma once

// Shared math of fastxai::scale_maps: M = mm(up(mm(relu(raw)))) per map, with
// mm(z) = (z - min z) / ((max z - min z) + 1e-7) and `up` the bilinear resampling of
// torch.nn.functional.interpolate(mode="bilinear", align_corners=False).
//
// The helpers follow the operations of the PyTorch reference (fastxai/ops/reference.py and ATen's
// upsample_bilinear2d) step by step, so backends agree with it to a few ulps, and propagate NaN the
// way it does. Bitwise equality is not a goal: ATen's CPU kernel switches between a sum of four
// products and nested blends by output size, with or without FMA contraction.

#include <cmath>
#include <cstdint>

#include "fastxai/macros.h"

namespace fastxai {

// pytorch-grad-cam's scale_cam_image epsilon, added to the range of every min-max scaling.
constexpr double kMinMaxEps = 1e-7;

// max(x, 0) that keeps NaN, like Tensor.clamp_min(0).
template <typename T>
FASTXAI_HD inline T relu(T x) {
  return x < T(0) ? T(0) : x;
}

// min(a, b) and max(a, b) that return NaN once either side is NaN, like Tensor.amin / amax.
template <typename T>
FASTXAI_HD inline T nan_min(T a, T b) {
  return (b < a || b != b) ? b : a;
}

template <typename T>
FASTXAI_HD inline T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// Denominator of the min-max scaling: (max z - min z) + eps. Equal to max(z - min z) + eps of the
// reference because subtracting one value is monotone under rounding.
template <typename T>
FASTXAI_HD inline T min_max_denominator(T lo, T hi) {
  return (hi - lo) + static_cast<T>(kMinMaxEps);
}

// One min-max scaled value: (z - lo) / denominator. A division, not a multiplication by the
// reciprocal, to round like the reference.
template <typename T>
FASTXAI_HD inline T min_max_scale(T z, T lo, T denominator) {
  return (z - lo) / denominator;
}

// The two source taps of one output index along one axis: out = v[i0] * w0 + v[i1] * w1.
template <typename T>
struct LinearTaps {
  int64_t i0;
  int64_t i1;
  T w0;
  T w1;
};

// a * b + c with one rounding. ATen's kernels are built with FMA contraction (its AVX2 CPU kernels
// and nvcc alike), so its source indices carry one rounding, not two.
template <typename T>
FASTXAI_HD inline T fused_multiply_add(T a, T b, T c) {
#ifdef __CUDA_ARCH__
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Source-to-destination ratio of one axis: in / out, in the accumulation type (float for float32
// inputs), as ATen's area_pixel_compute_scale for align_corners=False without a scale factor.
template <typename acc_t>
FASTXAI_HD inline acc_t bilinear_ratio(int64_t in_size, int64_t out_size) {
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

// Taps of output index `dst` for align_corners=False, ATen's upsample_bilinear2d:
//   src = max((dst + 0.5) * ratio - 0.5, 0)   (one rounding, see fused_multiply_add)
//   i0 = min(floor(src), in - 1),  i1 = min(i0 + 1, in - 1),  w1 = src - i0,  w0 = 1 - w1.
// Equal sizes copy (i1 = i0, w1 = 0) as ATen does, so a NaN neighbour never leaks in through a
// zero weight. So does the last pixel (i0 = in - 1), which ATen blends with itself, off by up to
// an ulp: copying keeps a map that is constant along an axis exactly constant.
template <typename T, typename acc_t>
FASTXAI_HD inline LinearTaps<T> bilinear_taps(
    acc_t ratio,
    int64_t dst,
    int64_t in_size,
    int64_t out_size) {
  if (in_size == out_size) {
    return {dst, dst, T(1), T(0)};
  }
  acc_t src = fused_multiply_add(
      ratio, static_cast<acc_t>(dst) + static_cast<acc_t>(0.5), static_cast<acc_t>(-0.5));
  if (src < acc_t(0)) {
    src = acc_t(0);
  }
  const int64_t i0 = static_cast<int64_t>(src);  // floor, as src >= 0
  if (i0 >= in_size - 1) {
    return {in_size - 1, in_size - 1, T(1), T(0)};
  }
  const T w1 = static_cast<T>(src - static_cast<acc_t>(i0));
  return {i0, i0 + 1, T(1) - w1, w1};
}

// v0 * w0 + v1 * w1: one linear interpolation. Bilinear is
// blend(blend(v00, v01, wx0, wx1), blend(v10, v11, wx0, wx1), wy0, wy1): columns inside, rows
// outside, the order of ATen's generic kernel.
template <typename T>
FASTXAI_HD inline T blend(T v0, T v1, T w0, T w1) {
  return v0 * w0 + v1 * w1;
}

}  // namespace fastxai
