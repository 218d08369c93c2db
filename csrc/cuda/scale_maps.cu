// CUDA kernel of fastxai::scale_maps: M = mm(up(mm(relu(raw)))) per map, one block per map.
//
// Each block reduces relu(raw) of its map to (min, max), writes the bilinear samples of the scaled
// low-resolution map while reducing their (min, max), then rescales the values it wrote. The math
// is csrc/include/fastxai/scale_maps.h, shared with the CPU kernel.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "block_min_max.cuh"
#include "fastxai/scale_maps.h"

namespace fastxai {
namespace {

using cuda::block_min_max;
using cuda::kThreadsPerBlock;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) scale_maps_kernel(
    const scalar_t* __restrict__ raw,
    scalar_t* __restrict__ out,
    int64_t in_height,
    int64_t in_width,
    int64_t out_height,
    int64_t out_width) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in_pixels = in_height * in_width;
  const int64_t out_pixels = out_height * out_width;
  const int64_t map = blockIdx.x;
  const scalar_t* raw_map = raw + map * in_pixels;
  scalar_t* out_map = out + map * out_pixels;

  // (+inf, -inf) is the identity of the NaN-propagating (min, max): threads without pixels leave
  // the block reduction unchanged.
  const scalar_t infinity = static_cast<scalar_t>(INFINITY);
  scalar_t low_lo = infinity;
  scalar_t low_hi = -infinity;
  for (int64_t i = threadIdx.x; i < in_pixels; i += blockDim.x) {
    const scalar_t v = relu(raw_map[i]);
    low_lo = nan_min(low_lo, v);
    low_hi = nan_max(low_hi, v);
  }
  block_min_max(low_lo, low_hi);
  const scalar_t low_denominator = min_max_denominator(low_lo, low_hi);

  const acc_t y_ratio = bilinear_ratio<acc_t>(in_height, out_height);
  const acc_t x_ratio = bilinear_ratio<acc_t>(in_width, out_width);
  auto scaled_low = [&](int64_t y, int64_t x) {
    return min_max_scale(relu(raw_map[y * in_width + x]), low_lo, low_denominator);
  };
  auto upsampled = [&](int64_t i) {
    const auto ty = bilinear_taps<scalar_t>(y_ratio, i / out_width, in_height, out_height);
    const auto tx = bilinear_taps<scalar_t>(x_ratio, i % out_width, in_width, out_width);
    const scalar_t top = blend(scaled_low(ty.i0, tx.i0), scaled_low(ty.i0, tx.i1), tx.w0, tx.w1);
    const scalar_t bottom = blend(scaled_low(ty.i1, tx.i0), scaled_low(ty.i1, tx.i1), tx.w0, tx.w1);
    return blend(top, bottom, ty.w0, ty.w1);
  };

  scalar_t up_lo = infinity;
  scalar_t up_hi = -infinity;
  for (int64_t i = threadIdx.x; i < out_pixels; i += blockDim.x) {
    const scalar_t v = upsampled(i);
    out_map[i] = v;
    up_lo = nan_min(up_lo, v);
    up_hi = nan_max(up_hi, v);
  }
  block_min_max(up_lo, up_hi);
  const scalar_t up_denominator = min_max_denominator(up_lo, up_hi);

  for (int64_t i = threadIdx.x; i < out_pixels; i += blockDim.x) {
    out_map[i] = min_max_scale(out_map[i], up_lo, up_denominator);
  }
}

at::Tensor scale_maps_cuda(const at::Tensor& raw, int64_t height, int64_t width) {
  TORCH_CHECK(raw.dim() == 3, "scale_maps: raw must be (N, h, w), got ", raw.dim(), " dims");
  TORCH_CHECK(height > 0, "scale_maps: height must be positive, got ", height);
  TORCH_CHECK(width > 0, "scale_maps: width must be positive, got ", width);
  TORCH_CHECK(
      raw.size(1) > 0 && raw.size(2) > 0,
      "scale_maps: raw maps must be non-empty, got (h, w) = (",
      raw.size(1),
      ", ",
      raw.size(2),
      ")");
  TORCH_CHECK(
      raw.size(0) <= std::numeric_limits<int32_t>::max(),
      "scale_maps: at most 2^31 - 1 maps per call on CUDA, got ", raw.size(0));
  const c10::cuda::CUDAGuard device_guard(raw.device());
  at::Tensor out = at::empty({raw.size(0), height, width}, raw.options());
  if (raw.size(0) == 0) {
    return out;
  }
  const at::Tensor raw_contiguous = raw.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "scale_maps", [&] {
    const auto num_blocks = static_cast<unsigned int>(raw.size(0));
    scale_maps_kernel<scalar_t><<<num_blocks, kThreadsPerBlock, 0, stream>>>(
        raw_contiguous.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        raw.size(1),
        raw.size(2),
        height,
        width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CUDA, m) {
  m.impl("scale_maps", &scale_maps_cuda);
}

}  // namespace fastxai
