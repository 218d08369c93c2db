#pragma once

// Shared math of fastxai::layercam and fastxai::layercam_backward.
//
// Forward, per image n and pixel i:  s = sum_k relu(g_k) * A_k,  M = relu(s).
// Backward, with G = dL/dM:          dL/ds = G * [M > 0],
//                                    dL/dg_k = dL/ds * [g_k > 0] * A_k,  dL/dA_k = dL/ds * relu(g_k).
// The derivative indicators are "not x <= 0", ATen's threshold_backward: a NaN passes its gradient
// on, as torch.relu's backward does.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastxai/macros.h"

namespace fastxai {

// One channel's contribution relu(g) * A, with relu keeping NaN like Tensor.clamp_min(0).
template <typename T>
FASTXAI_HD inline T layercam_contribution(T gradient, T activation) {
  return (gradient < T(0) ? T(0) : gradient) * activation;
}

// The map from the channel sum: relu(s), keeping NaN.
template <typename T>
FASTXAI_HD inline T layercam_map(T channel_sum) {
  return channel_sum < T(0) ? T(0) : channel_sum;
}

// dL/ds at one pixel from the upstream gradient G and the saved map M = relu(s): M > 0 iff s > 0.
// Selects rather than products with 0/1 indicators, so an infinite factor on the zero branch gives
// 0 as in ATen's threshold_backward, not NaN.
template <typename T>
FASTXAI_HD inline T layercam_sum_gradient(T grad_map, T map) {
  return map <= T(0) ? T(0) : grad_map;
}

// `value` where `keep`, else +0. On the host a bitwise AND, not a branch: GCC sinks a product
// that only one side of a select uses into a branch, and under -ftrapping-math it may then not
// vectorise the loop (2.5x slower, and data-dependent branches mispredict).
template <typename T>
FASTXAI_HD inline T keep_or_zero(bool keep, T value) {
#ifdef __CUDA_ARCH__
  return keep ? value : T(0);
#else
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "keep_or_zero: float or double");
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits bits;
  std::memcpy(&bits, &value, sizeof(T));
  bits &= Bits(0) - static_cast<Bits>(keep);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
#endif
}

// dL/dg_k = dL/ds * relu'(g_k) * A_k; exactly 0 where g_k <= 0, even next to an infinite A_k.
template <typename T>
FASTXAI_HD inline T layercam_gradient_gradient(T sum_gradient, T gradient, T activation) {
  return keep_or_zero(!(gradient <= T(0)), sum_gradient * activation);
}

// dL/dA_k = dL/ds * relu(g_k).
template <typename T>
FASTXAI_HD inline T layercam_activation_gradient(T sum_gradient, T gradient) {
  return sum_gradient * (gradient < T(0) ? T(0) : gradient);
}

}  // namespace fastxai
