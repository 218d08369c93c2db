// CUDA kernels of fastxai::layercam and fastxai::layercam_backward.
//
// Forward: one thread per (image, pixel) sums relu(g_k) * A_k over the channels; neighbouring
// threads read neighbouring pixels of one channel, so every load is coalesced. Backward: one
// thread per element. The math is csrc/include/fastxai/layercam.h, shared with the CPU kernels.

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
#include <tuple>

#include "fastxai/cam_prior_checks.h"
#include "fastxai/layercam.h"

namespace fastxai {
namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loops cover the rest; enough blocks to fill any current GPU.
constexpr int64_t kMaxBlocks = 8192;

unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>(
      std::min<int64_t>(kMaxBlocks, (work + kThreadsPerBlock - 1) / kThreadsPerBlock));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) layercam_forward_kernel(
    const scalar_t* __restrict__ gradient,
    const scalar_t* __restrict__ activation,
    scalar_t* __restrict__ map,
    int64_t images,
    int64_t channels,
    int64_t pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = images * pixels;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = index / pixels;
    const int64_t first = n * channels * pixels + index % pixels;
    acc_t sum = 0;
    for (int64_t k = 0; k < channels; ++k) {
      const int64_t offset = first + k * pixels;
      sum += static_cast<acc_t>(layercam_contribution(gradient[offset], activation[offset]));
    }
    map[index] = static_cast<scalar_t>(layercam_map(sum));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) layercam_backward_kernel(
    const scalar_t* __restrict__ grad_map,
    const scalar_t* __restrict__ gradient,
    const scalar_t* __restrict__ activation,
    const scalar_t* __restrict__ map,
    scalar_t* __restrict__ grad_gradient,
    scalar_t* __restrict__ grad_activation,
    int64_t channels,
    int64_t pixels,
    int64_t total) {
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t pixel = (index / (channels * pixels)) * pixels + index % pixels;
    const scalar_t ds = layercam_sum_gradient(grad_map[pixel], map[pixel]);
    const scalar_t g = gradient[index];
    grad_gradient[index] = layercam_gradient_gradient(ds, g, activation[index]);
    grad_activation[index] = layercam_activation_gradient(ds, g);
  }
}

at::Tensor layercam_cuda(const at::Tensor& gradient, const at::Tensor& activation) {
  check_layercam_inputs(gradient, activation);
  const c10::cuda::CUDAGuard device_guard(gradient.device());
  const int64_t images = gradient.size(0);
  const int64_t channels = gradient.size(1);
  const int64_t pixels = gradient.size(2) * gradient.size(3);
  at::Tensor map = at::empty({images, gradient.size(2), gradient.size(3)}, gradient.options());
  if (map.numel() == 0) {
    return map;
  }
  const at::Tensor g = gradient.contiguous();
  const at::Tensor a = activation.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gradient.scalar_type(), "layercam", [&] {
    layercam_forward_kernel<scalar_t><<<blocks_for(map.numel()), kThreadsPerBlock, 0, stream>>>(
        g.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(),
        map.mutable_data_ptr<scalar_t>(),
        images,
        channels,
        pixels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return map;
}

std::tuple<at::Tensor, at::Tensor> layercam_backward_cuda(
    const at::Tensor& grad_map,
    const at::Tensor& gradient,
    const at::Tensor& activation,
    const at::Tensor& map) {
  check_layercam_backward_inputs(grad_map, gradient, activation, map);
  const c10::cuda::CUDAGuard device_guard(gradient.device());
  at::Tensor grad_gradient = at::empty(gradient.sizes(), gradient.options());
  at::Tensor grad_activation = at::empty(gradient.sizes(), gradient.options());
  const int64_t total = gradient.numel();
  if (total == 0) {
    return {grad_gradient, grad_activation};
  }
  const at::Tensor upstream = grad_map.contiguous();
  const at::Tensor m = map.contiguous();
  const at::Tensor g = gradient.contiguous();
  const at::Tensor a = activation.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gradient.scalar_type(), "layercam_backward", [&] {
    layercam_backward_kernel<scalar_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        upstream.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(),
        m.const_data_ptr<scalar_t>(),
        grad_gradient.mutable_data_ptr<scalar_t>(),
        grad_activation.mutable_data_ptr<scalar_t>(),
        gradient.size(1),
        gradient.size(2) * gradient.size(3),
        total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_gradient, grad_activation};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CUDA, m) {
  m.impl("layercam", &layercam_cuda);
  m.impl("layercam_backward", &layercam_backward_cuda);
}

}  // namespace fastxai
