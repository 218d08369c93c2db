// CUDA kernels of fastxai::mask_priors and fastxai::mask_priors_backward.
//
// Forward: a (chunk, plane) grid; each block sums the terms of its pixels and writes one partial
// PriorSums, then one block per sample folds its partials in a fixed order and finishes the three
// terms (deterministic, no atomics). Backward: one thread per pixel. The math is
// csrc/include/fastxai/mask_priors.h, shared with the CPU kernels.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastxai/cam_prior_checks.h"
#include "fastxai/mask_priors.h"

namespace fastxai {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
// Pixels per forward block: a few per thread, so small planes still spread over many blocks.
constexpr int64_t kPixelsPerChunk = kThreadsPerBlock * 16;
constexpr int64_t kMaxChunksPerPlane = 1024;
constexpr int64_t kMaxBlocks = 8192;

// Block-wide sum; every thread gets the result. All threads of the block must call it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kWarpsPerBlock];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x % kWarpSize == 0) {
    warp_sums[threadIdx.x / kWarpSize] = value;
  }
  __syncthreads();
  value = warp_sums[0];
  for (int w = 1; w < kWarpsPerBlock; ++w) {
    value += warp_sums[w];
  }
  // The shared slots are reused by the next call.
  __syncthreads();
  return value;
}

template <typename acc_t>
__device__ PriorSums<acc_t> block_sums(PriorSums<acc_t> s) {
  s.area = block_sum(s.area);
  s.binarisation = block_sum(s.binarisation);
  s.tv.vertical = block_sum(s.tv.vertical);
  s.tv.horizontal = block_sum(s.tv.horizontal);
  s.tv.diagonal = block_sum(s.tv.diagonal);
  s.tv.anti_diagonal = block_sum(s.tv.anti_diagonal);
  return s;
}

template <typename scalar_t>
__device__ Neighbourhood<scalar_t> neighbourhood_at(
    const scalar_t* plane,
    int64_t height,
    int64_t width,
    int64_t pixel) {
  const int64_t y = pixel / width;
  const scalar_t* row = plane + y * width;
  const scalar_t* above = y > 0 ? row - width : nullptr;
  const scalar_t* below = y + 1 < height ? row + width : nullptr;
  return load_neighbourhood<scalar_t>(above, row, below, pixel % width, width);
}

// blockIdx.x: plane (sample * channels + channel; up to 2^31 - 1), blockIdx.y: chunk of the
// plane (at most kMaxChunksPerPlane, far below gridDim.y's 65535).
template <bool kEightNeighbours, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock) mask_priors_partial_kernel(
    const scalar_t* __restrict__ p,
    PriorSums<acc_t>* __restrict__ partials,
    int64_t height,
    int64_t width) {
  const int64_t pixels = height * width;
  const scalar_t* plane = p + int64_t{blockIdx.x} * pixels;
  PriorSums<acc_t> sums;
  for (int64_t pixel = blockIdx.y * int64_t{blockDim.x} + threadIdx.x; pixel < pixels;
       pixel += int64_t{gridDim.y} * blockDim.x) {
    accumulate_pixel<kEightNeighbours>(neighbourhood_at(plane, height, width, pixel), sums);
  }
  sums = block_sums(sums);
  if (threadIdx.x == 0) {
    partials[int64_t{blockIdx.x} * gridDim.y + blockIdx.y] = sums;
  }
}

// One block per sample: folds the sample's partials (a fixed order) into its three terms.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock) mask_priors_finish_kernel(
    const PriorSums<acc_t>* __restrict__ partials,
    scalar_t* __restrict__ terms,
    int64_t partials_per_sample,
    PriorScales<acc_t> scales) {
  const PriorSums<acc_t>* sample_partials = partials + blockIdx.x * partials_per_sample;
  PriorSums<acc_t> sums;
  for (int64_t i = threadIdx.x; i < partials_per_sample; i += blockDim.x) {
    sums.add(sample_partials[i]);
  }
  sums = block_sums(sums);
  if (threadIdx.x == 0) {
    acc_t sample_terms[3];
    finish_priors(sums, scales, sample_terms);
    for (int t = 0; t < 3; ++t) {
      terms[blockIdx.x * 3 + t] = static_cast<scalar_t>(sample_terms[t]);
    }
  }
}

template <bool kEightNeighbours, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock) mask_priors_backward_kernel(
    const scalar_t* __restrict__ grad_terms,
    const scalar_t* __restrict__ p,
    scalar_t* __restrict__ grad_p,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t total,
    PriorScales<acc_t> scales) {
  const int64_t pixels = height * width;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t plane = index / pixels;
    const scalar_t* upstream = grad_terms + (plane / channels) * 3;
    const auto factors = prior_gradient_factors<acc_t>(
        static_cast<acc_t>(upstream[0]),
        static_cast<acc_t>(upstream[1]),
        static_cast<acc_t>(upstream[2]),
        scales);
    const auto n = neighbourhood_at(p + plane * pixels, height, width, index % pixels);
    grad_p[index] = pixel_gradient<kEightNeighbours>(n, factors);
  }
}

at::Tensor mask_priors_cuda(const at::Tensor& p, int64_t neighbours) {
  check_mask_priors_inputs(p, neighbours);
  TORCH_CHECK(
      p.size(0) * p.size(1) <= std::numeric_limits<int32_t>::max(),
      "mask_priors: at most 2^31 - 1 planes (N * C) per call on CUDA, got ",
      p.size(0) * p.size(1));
  const c10::cuda::CUDAGuard device_guard(p.device());
  at::Tensor terms = at::empty({p.size(0), 3}, p.options());
  if (p.size(0) == 0) {
    return terms;
  }
  const at::Tensor p_contiguous = p.contiguous();
  const int64_t channels = p.size(1);
  const int64_t height = p.size(2);
  const int64_t width = p.size(3);
  const int64_t planes = p.size(0) * channels;
  const int64_t chunks = std::min<int64_t>(
      kMaxChunksPerPlane, (height * width + kPixelsPerChunk - 1) / kPixelsPerChunk);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "mask_priors", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor workspace = at::empty(
        {planes * chunks * static_cast<int64_t>(sizeof(PriorSums<acc_t>))},
        p.options().dtype(at::kByte));
    auto* partials = reinterpret_cast<PriorSums<acc_t>*>(workspace.mutable_data_ptr());
    const dim3 grid(static_cast<unsigned int>(planes), static_cast<unsigned int>(chunks));
    auto launch = [&](auto eight) {
      mask_priors_partial_kernel<decltype(eight)::value, scalar_t, acc_t>
          <<<grid, kThreadsPerBlock, 0, stream>>>(
              p_contiguous.const_data_ptr<scalar_t>(), partials, height, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (neighbours == 8) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    const auto scales = prior_scales<acc_t>(channels, height, width, neighbours == 8);
    mask_priors_finish_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(p.size(0)), kThreadsPerBlock, 0, stream>>>(
            partials, terms.mutable_data_ptr<scalar_t>(), channels * chunks, scales);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return terms;
}

at::Tensor mask_priors_backward_cuda(
    const at::Tensor& grad_terms,
    const at::Tensor& p,
    int64_t neighbours) {
  check_mask_priors_backward_inputs(grad_terms, p, neighbours);
  const c10::cuda::CUDAGuard device_guard(p.device());
  at::Tensor grad_p = at::empty(p.sizes(), p.options());
  const int64_t total = p.numel();
  if (total == 0) {
    return grad_p;
  }
  const at::Tensor upstream = grad_terms.contiguous();
  const at::Tensor p_contiguous = p.contiguous();
  const unsigned int blocks = static_cast<unsigned int>(
      std::min<int64_t>(kMaxBlocks, (total + kThreadsPerBlock - 1) / kThreadsPerBlock));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "mask_priors_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto scales = prior_scales<acc_t>(p.size(1), p.size(2), p.size(3), neighbours == 8);
    auto launch = [&](auto eight) {
      mask_priors_backward_kernel<decltype(eight)::value, scalar_t, acc_t>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(
              upstream.const_data_ptr<scalar_t>(),
              p_contiguous.const_data_ptr<scalar_t>(),
              grad_p.mutable_data_ptr<scalar_t>(),
              p.size(1),
              p.size(2),
              p.size(3),
              total,
              scales);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (neighbours == 8) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return grad_p;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CUDA, m) {
  m.impl("mask_priors", &mask_priors_cuda);
  m.impl("mask_priors_backward", &mask_priors_backward_cuda);
}

}  // namespace fastxai
