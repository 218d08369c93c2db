#pragma once

// Shared math of fastxai::fuse_maps: L raw maps r_l (N, h_l, w_l) of one image batch fused into
// one (N, H, W) map in [0, 1], with mm, relu and the bilinear `up` of scale_maps.h:
//   mean (pytorch-grad-cam):  M = mm((1 / L) sum_l relu(up(mm(relu(r_l)))))
//   tanh (Layer-CAM, Eq. 9):  M = mm(max_l tanh(2 M_l / max(max M_l, 1e-7))),
//                             M_l = mm(up(mm(relu(r_l))))  (scale_maps of layer l)
// A fused value is built by fuse_identity, one fuse_accumulate per layer in layer order, and
// fuse_finish; the backends then min-max scale the result. Any NaN of a layer's map makes the
// whole fused map NaN, as in the reference (every min-max reduction propagates it).

#include <cmath>
#include <cstdint>

#include "fastxai/macros.h"
#include "fastxai/scale_maps.h"

namespace fastxai {

enum class Fusion : int { kMean = 0, kTanh = 1 };

// mm(relu(raw)) at low-resolution pixel (y, x) of a row-major map of width `in_width`.
template <typename T>
FASTXAI_HD inline T scaled_low(const T* raw, int64_t in_width, int64_t y, int64_t x, T lo, T den) {
  return min_max_scale(relu(raw[y * in_width + x]), lo, den);
}

// up(mm(relu(raw))) at one output pixel, given its taps along y and x: columns blended first,
// then rows, the order the CPU kernels use on precomputed column blends.
template <typename T>
FASTXAI_HD inline T upsampled_sample(
    const T* raw,
    int64_t in_width,
    T lo,
    T den,
    const LinearTaps<T>& ty,
    const LinearTaps<T>& tx) {
  const T top = blend(
      scaled_low(raw, in_width, ty.i0, tx.i0, lo, den),
      scaled_low(raw, in_width, ty.i0, tx.i1, lo, den),
      tx.w0,
      tx.w1);
  const T bottom = blend(
      scaled_low(raw, in_width, ty.i1, tx.i0, lo, den),
      scaled_low(raw, in_width, ty.i1, tx.i1, lo, den),
      tx.w0,
      tx.w1);
  return blend(top, bottom, ty.w0, ty.w1);
}

// tanh fusion's divisor of layer l: max M_l clamped below at 1e-7 (NaN stays NaN, like
// clamp_min). max M_l = mm(max up_l), as the scaling is monotone under rounding.
template <typename T>
FASTXAI_HD inline T tanh_peak(T up_lo, T up_den, T up_hi) {
  const T peak = min_max_scale(up_hi, up_lo, up_den);
  const T floor = static_cast<T>(kMinMaxEps);
  return peak < floor ? floor : peak;
}

// 2 M_l / peak_l at one pixel, M_l = mm(up) with the range (up_lo, up_den) of layer l.
template <typename T>
FASTXAI_HD inline T tanh_argument(T up, T up_lo, T up_den, T peak) {
  return (T(2) * min_max_scale(up, up_lo, up_den)) / peak;
}

// tanh(2 M_l / peak_l). (The CPU kernel applies ATen's vectorised tanh to tanh_argument instead.)
template <typename T>
FASTXAI_HD inline T tanh_term(T up, T up_lo, T up_den, T peak) {
#ifdef __CUDA_ARCH__
  return ::tanh(tanh_argument(up, up_lo, up_den, peak));
#else
  return std::tanh(tanh_argument(up, up_lo, up_den, peak));
#endif
}

template <typename T>
FASTXAI_HD inline T fuse_identity(Fusion fusion) {
  return fusion == Fusion::kMean ? T(0) : -static_cast<T>(INFINITY);
}

// One layer's term into the running value: a sum of relu(up_l) (mean) or a NaN-propagating
// maximum of tanh terms (tanh).
template <typename T>
FASTXAI_HD inline T fuse_accumulate(Fusion fusion, T acc, T term) {
  return fusion == Fusion::kMean ? acc + relu(term) : nan_max(acc, term);
}

// The fused value before the final min-max: the sum over L layers divided by L (as Tensor.mean
// computes it), or the maximum unchanged.
template <typename T>
FASTXAI_HD inline T fuse_finish(Fusion fusion, T acc, int64_t layers) {
  return fusion == Fusion::kMean ? acc / static_cast<T>(layers) : acc;
}

}  // namespace fastxai
