// CUDA kernel of fastxai::rpi_select: one block per image, one warp per ladder row (T rows per
// image), then the block's first thread picks the first argmax (csrc/include/fastxai/rpi_select.h).
//
// A warp reads its row twice (the max, then the sum of exp(l - max)) and writes its class
// probability and RPI value;
// nothing of size K is written.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fastxai/rpi_select.h"
#include "fastxai/scale_maps.h"
#include "fastxai/tft_checks.h"

namespace fastxai {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;

__device__ inline float device_exp(float x) {
  return expf(x);
}

__device__ inline double device_exp(double x) {
  return exp(x);
}

// Warp-wide NaN-propagating max and sum; every lane gets the result.
template <typename scalar_t>
__device__ scalar_t warp_max(scalar_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = nan_max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

template <typename scalar_t>
__device__ scalar_t warp_sum(scalar_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) rpi_select_kernel(
    const scalar_t* __restrict__ logits,
    const int64_t* __restrict__ classes,
    const scalar_t* __restrict__ original,
    scalar_t* __restrict__ rpi,
    int64_t* __restrict__ index,
    scalar_t* __restrict__ probability,
    int64_t num_thresholds,
    int64_t num_classes) {
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t c = classes[n];
  const scalar_t p0 = original[n];
  scalar_t* image_rpi = rpi + n * num_thresholds;
  scalar_t* image_probability = probability + n * num_thresholds;
  if (c < 0 || c >= num_classes) {
    // A device assert would end the CUDA context: NaN and -1, as the Triton kernel, and the
    // Python front door raises before launching. c is the block's own: every thread returns.
    for (int64_t t = threadIdx.x; t < num_thresholds; t += blockDim.x) {
      image_rpi[t] = std::numeric_limits<scalar_t>::quiet_NaN();
      image_probability[t] = std::numeric_limits<scalar_t>::quiet_NaN();
    }
    if (threadIdx.x == 0) {
      index[n] = -1;
    }
    return;
  }

  for (int64_t t = warp; t < num_thresholds; t += kWarpsPerBlock) {
    const scalar_t* row = logits + (n * num_thresholds + t) * num_classes;
    scalar_t row_max = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = lane; j < num_classes; j += kWarpSize) {
      row_max = nan_max(row_max, row[j]);
    }
    row_max = warp_max(row_max);
    scalar_t sum = 0;
    for (int64_t j = lane; j < num_classes; j += kWarpSize) {
      sum += device_exp(row[j] - row_max);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      const scalar_t p = device_exp(row[c] - row_max) / sum;
      image_probability[t] = p;
      image_rpi[t] = relative_probability_increase(p, p0);
    }
  }
  // The block's global writes are visible to its own threads after the barrier.
  __syncthreads();
  if (threadIdx.x == 0) {
    scalar_t best = -std::numeric_limits<scalar_t>::infinity();
    int64_t best_t = 0;
    for (int64_t t = 0; t < num_thresholds; ++t) {
      const scalar_t value = image_rpi[t];
      if (t == 0 || replaces_maximum(value, best)) {
        best = value;
        best_t = t;
      }
    }
    index[n] = num_thresholds == 0 ? int64_t{-1} : selected_index(best_t, best);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rpi_select_cuda(
    const at::Tensor& logits,
    const at::Tensor& classes,
    const at::Tensor& original) {
  const SelectShape shape = check_select_inputs("rpi_select", logits, classes, original);
  TORCH_CHECK(
      shape.n <= std::numeric_limits<int32_t>::max(),
      "rpi_select: at most 2^31 - 1 images per call on CUDA, got ", shape.n);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor rpi = at::empty({shape.n, shape.thresholds}, logits.options());
  at::Tensor index = at::empty({shape.n}, classes.options());
  at::Tensor probability = at::empty({shape.n, shape.thresholds}, logits.options());
  if (shape.n == 0) {
    return {rpi, index, probability};
  }
  const at::Tensor logits_contiguous = logits.contiguous();
  const at::Tensor classes_contiguous = classes.contiguous();
  const at::Tensor original_contiguous = original.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "rpi_select", [&] {
    const auto num_blocks = static_cast<unsigned int>(shape.n);
    rpi_select_kernel<scalar_t><<<num_blocks, kThreadsPerBlock, 0, stream>>>(
        logits_contiguous.const_data_ptr<scalar_t>(),
        classes_contiguous.const_data_ptr<int64_t>(),
        original_contiguous.const_data_ptr<scalar_t>(),
        rpi.mutable_data_ptr<scalar_t>(),
        index.mutable_data_ptr<int64_t>(),
        probability.mutable_data_ptr<scalar_t>(),
        shape.thresholds,
        shape.classes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rpi, index, probability};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CUDA, m) {
  m.impl("rpi_select", &rpi_select_cuda);
}

}  // namespace fastxai
