// CUDA kernels of fastxai::fuse_maps: L layers' raw maps -> one fused (N, H, W) map per image.
//
// Two launches. layer_ranges: one block per (image, layer) reduces relu(raw) to its (min, max)
// and, for tanh fusion, the upsampled map to its range and tanh's divisor. fuse: one block per
// image samples every layer at each output pixel, folds the terms (fuse_maps.h), writes the fused
// value while reducing its (min, max), then rescales the values it wrote. The math is
// csrc/include/fastxai/fuse_maps.h, shared with the CPU kernel.

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
#include <string_view>
#include <vector>

#include "block_min_max.cuh"
#include "fastxai/fuse_maps.h"
#include "fastxai/fuse_maps_checks.h"

namespace fastxai {
namespace {

using cuda::block_min_max;
using cuda::kThreadsPerBlock;
// Layers per launch: their pointers and sizes travel as one kernel argument.
constexpr int kMaxLayers = 16;

template <typename scalar_t>
struct LayerArgs {
  const scalar_t* raw[kMaxLayers];
  int64_t height[kMaxLayers];
  int64_t width[kMaxLayers];
  int num_layers;
};

// Per (image, layer): the range of mm(relu(raw)) and, for tanh fusion, of up(...) and the divisor.
template <typename scalar_t>
struct LayerRange {
  scalar_t low_lo;
  scalar_t low_den;
  scalar_t up_lo;
  scalar_t up_den;
  scalar_t peak;
};

// The taps of output pixel i of a layer, and its upsampled value.
template <typename scalar_t>
__device__ scalar_t layer_sample(
    const scalar_t* raw_map,
    int64_t in_height,
    int64_t in_width,
    int64_t out_height,
    int64_t out_width,
    scalar_t low_lo,
    scalar_t low_den,
    int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto ty = bilinear_taps<scalar_t>(
      bilinear_ratio<acc_t>(in_height, out_height), i / out_width, in_height, out_height);
  const auto tx = bilinear_taps<scalar_t>(
      bilinear_ratio<acc_t>(in_width, out_width), i % out_width, in_width, out_width);
  return upsampled_sample(raw_map, in_width, low_lo, low_den, ty, tx);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) layer_ranges_kernel(
    LayerArgs<scalar_t> layers,
    LayerRange<scalar_t>* __restrict__ ranges,
    int64_t out_height,
    int64_t out_width,
    bool with_up_range) {
  const int64_t map = blockIdx.x;
  const int l = blockIdx.y;
  const int64_t in_height = layers.height[l];
  const int64_t in_width = layers.width[l];
  const int64_t in_pixels = in_height * in_width;
  const scalar_t* raw_map = layers.raw[l] + map * in_pixels;

  // (+inf, -inf) is the identity of the NaN-propagating (min, max).
  const scalar_t infinity = static_cast<scalar_t>(INFINITY);
  scalar_t low_lo = infinity;
  scalar_t low_hi = -infinity;
  for (int64_t i = threadIdx.x; i < in_pixels; i += blockDim.x) {
    const scalar_t v = relu(raw_map[i]);
    low_lo = nan_min(low_lo, v);
    low_hi = nan_max(low_hi, v);
  }
  block_min_max(low_lo, low_hi);
  const scalar_t low_den = min_max_denominator(low_lo, low_hi);

  LayerRange<scalar_t> range{low_lo, low_den, scalar_t(0), scalar_t(1), scalar_t(1)};
  if (with_up_range) {
    scalar_t up_lo = infinity;
    scalar_t up_hi = -infinity;
    const int64_t out_pixels = out_height * out_width;
    for (int64_t i = threadIdx.x; i < out_pixels; i += blockDim.x) {
      const scalar_t v = layer_sample(
          raw_map, in_height, in_width, out_height, out_width, low_lo, low_den, i);
      up_lo = nan_min(up_lo, v);
      up_hi = nan_max(up_hi, v);
    }
    block_min_max(up_lo, up_hi);
    range.up_lo = up_lo;
    range.up_den = min_max_denominator(up_lo, up_hi);
    range.peak = tanh_peak(up_lo, range.up_den, up_hi);
  }
  if (threadIdx.x == 0) {
    ranges[map * layers.num_layers + l] = range;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) fuse_kernel(
    LayerArgs<scalar_t> layers,
    const LayerRange<scalar_t>* __restrict__ ranges,
    scalar_t* __restrict__ out,
    int64_t out_height,
    int64_t out_width,
    Fusion fusion) {
  const int64_t map = blockIdx.x;
  const int64_t out_pixels = out_height * out_width;
  scalar_t* out_map = out + map * out_pixels;
  const LayerRange<scalar_t>* map_ranges = ranges + map * layers.num_layers;

  const scalar_t infinity = static_cast<scalar_t>(INFINITY);
  scalar_t lo = infinity;
  scalar_t hi = -infinity;
  for (int64_t i = threadIdx.x; i < out_pixels; i += blockDim.x) {
    scalar_t acc = fuse_identity<scalar_t>(fusion);
    for (int l = 0; l < layers.num_layers; ++l) {
      const LayerRange<scalar_t> r = map_ranges[l];
      const int64_t in_height = layers.height[l];
      const int64_t in_width = layers.width[l];
      const scalar_t* raw_map = layers.raw[l] + map * in_height * in_width;
      const scalar_t up =
          layer_sample(raw_map, in_height, in_width, out_height, out_width, r.low_lo, r.low_den, i);
      const scalar_t term = fusion == Fusion::kMean ? up : tanh_term(up, r.up_lo, r.up_den, r.peak);
      acc = fuse_accumulate(fusion, acc, term);
    }
    const scalar_t v = fuse_finish(fusion, acc, layers.num_layers);
    out_map[i] = v;
    lo = nan_min(lo, v);
    hi = nan_max(hi, v);
  }
  block_min_max(lo, hi);
  const scalar_t den = min_max_denominator(lo, hi);
  for (int64_t i = threadIdx.x; i < out_pixels; i += blockDim.x) {
    out_map[i] = min_max_scale(out_map[i], lo, den);
  }
}

at::Tensor fuse_maps_cuda(
    at::TensorList raws,
    int64_t height,
    int64_t width,
    std::string_view fusion) {
  const Fusion kind = check_fuse_maps_inputs(raws, height, width, fusion);
  TORCH_CHECK(
      raws.size() <= static_cast<size_t>(kMaxLayers),
      "fuse_maps: at most ",
      kMaxLayers,
      " layers per call on CUDA, got ",
      raws.size());
  const int64_t num_maps = raws[0].size(0);
  TORCH_CHECK(
      num_maps <= std::numeric_limits<int32_t>::max(),
      "fuse_maps: at most 2^31 - 1 maps per call on CUDA, got ",
      num_maps);
  const c10::cuda::CUDAGuard device_guard(raws[0].device());
  at::Tensor out = at::empty({num_maps, height, width}, raws[0].options());
  if (num_maps == 0) {
    return out;
  }
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(raws.size());
  for (const at::Tensor& raw : raws) {
    contiguous.push_back(raw.contiguous());
  }
  const int num_layers = static_cast<int>(raws.size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fuse_maps", [&] {
    LayerArgs<scalar_t> layers{};
    layers.num_layers = num_layers;
    for (int l = 0; l < num_layers; ++l) {
      layers.raw[l] = contiguous[l].const_data_ptr<scalar_t>();
      layers.height[l] = contiguous[l].size(1);
      layers.width[l] = contiguous[l].size(2);
    }
    // The (image, layer) ranges as raw bytes of the output's dtype: sizeof(LayerRange) is a
    // multiple of sizeof(scalar_t) and its alignment.
    constexpr int64_t range_elements = sizeof(LayerRange<scalar_t>) / sizeof(scalar_t);
    at::Tensor ranges = at::empty({num_maps * num_layers * range_elements}, out.options());
    auto* range_data =
        reinterpret_cast<LayerRange<scalar_t>*>(ranges.mutable_data_ptr<scalar_t>());
    const dim3 range_grid(
        static_cast<unsigned int>(num_maps), static_cast<unsigned int>(num_layers));
    layer_ranges_kernel<scalar_t><<<range_grid, kThreadsPerBlock, 0, stream>>>(
        layers, range_data, height, width, kind == Fusion::kTanh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fuse_kernel<scalar_t><<<static_cast<unsigned int>(num_maps), kThreadsPerBlock, 0, stream>>>(
        layers, range_data, out.mutable_data_ptr<scalar_t>(), height, width, kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CUDA, m) {
  m.impl("fuse_maps", &fuse_maps_cuda);
}

}  // namespace fastxai
