// CPU kernels of fastxai::layercam and fastxai::layercam_backward.
//
// Forward: M[n, i] = relu(sum_k relu(g[n, k, i]) * A[n, k, i]). A task owns a run of pixels of
// one image and streams the channels through an accumulator of that run: each input element is
// read once, in memory order within each channel.
// Backward: one pass over (g, A) writing dL/dg and dL/dA; the saved map says where s > 0.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "fastxai/cam_prior_checks.h"
#include "fastxai/layercam.h"

namespace fastxai {
namespace {

// Pixels per accumulator run: long enough to stream, short enough to stay in L1. Fewer images
// than threads get shorter runs (down to kMinPixelsPerRun) so that every thread has one.
constexpr int64_t kPixelsPerRun = 2048;
constexpr int64_t kMinPixelsPerRun = 256;
// Elements per backward task worth a thread.
constexpr int64_t kElementsPerTask = 1 << 15;

template <typename scalar_t>
void layercam_forward_kernel(
    const scalar_t* gradient,
    const scalar_t* activation,
    scalar_t* map,
    int64_t images,
    int64_t channels,
    int64_t pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels_per_thread = (images * pixels + at::get_num_threads() - 1) /
      std::max<int64_t>(1, at::get_num_threads());
  const int64_t run_length = std::min(
      pixels, std::clamp(pixels_per_thread, kMinPixelsPerRun, kPixelsPerRun));
  const int64_t runs_per_image = (pixels + run_length - 1) / run_length;
  const int64_t elements_per_run = run_length * std::max<int64_t>(channels, 1);
  const int64_t runs_per_task = std::max<int64_t>(1, kElementsPerTask / elements_per_run);
  // Each pixel sums its channels in the same order whatever the runs: results do not depend on
  // the number of threads.
  at::parallel_for(0, images * runs_per_image, runs_per_task, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(run_length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / runs_per_image;
      const int64_t first = (task % runs_per_image) * run_length;
      const int64_t count = std::min(run_length, pixels - first);
      acc_t* acc = sums.data();
      std::fill(acc, acc + count, acc_t(0));
      const int64_t image_offset = n * channels * pixels + first;
      for (int64_t k = 0; k < channels; ++k) {
        const scalar_t* g = gradient + image_offset + k * pixels;
        const scalar_t* a = activation + image_offset + k * pixels;
        for (int64_t i = 0; i < count; ++i) {
          acc[i] += static_cast<acc_t>(layercam_contribution(g[i], a[i]));
        }
      }
      scalar_t* out = map + n * pixels + first;
      for (int64_t i = 0; i < count; ++i) {
        out[i] = static_cast<scalar_t>(layercam_map(acc[i]));
      }
    }
  });
}

template <typename scalar_t>
void layercam_backward_kernel(
    const scalar_t* grad_map,
    const scalar_t* gradient,
    const scalar_t* activation,
    const scalar_t* map,
    scalar_t* grad_gradient,
    scalar_t* grad_activation,
    int64_t channels,
    int64_t pixels,
    int64_t planes) {
  const int64_t planes_per_task = std::max<int64_t>(1, kElementsPerTask / pixels);
  at::parallel_for(0, planes, planes_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / channels;
      const scalar_t* upstream = grad_map + n * pixels;
      const scalar_t* m = map + n * pixels;
      const int64_t offset = plane * pixels;
      const scalar_t* g = gradient + offset;
      const scalar_t* a = activation + offset;
      scalar_t* dg = grad_gradient + offset;
      scalar_t* da = grad_activation + offset;
      for (int64_t i = 0; i < pixels; ++i) {
        const scalar_t ds = layercam_sum_gradient(upstream[i], m[i]);
        dg[i] = layercam_gradient_gradient(ds, g[i], a[i]);
        da[i] = layercam_activation_gradient(ds, g[i]);
      }
    }
  });
}

at::Tensor layercam_cpu(const at::Tensor& gradient, const at::Tensor& activation) {
  check_layercam_inputs(gradient, activation);
  const int64_t images = gradient.size(0);
  const int64_t channels = gradient.size(1);
  const int64_t pixels = gradient.size(2) * gradient.size(3);
  at::Tensor map = at::empty({images, gradient.size(2), gradient.size(3)}, gradient.options());
  if (map.numel() == 0) {
    return map;
  }
  const at::Tensor g = gradient.contiguous();
  const at::Tensor a = activation.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gradient.scalar_type(), "layercam", [&] {
    layercam_forward_kernel<scalar_t>(
        g.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(),
        map.mutable_data_ptr<scalar_t>(),
        images,
        channels,
        pixels);
  });
  return map;
}

std::tuple<at::Tensor, at::Tensor> layercam_backward_cpu(
    const at::Tensor& grad_map,
    const at::Tensor& gradient,
    const at::Tensor& activation,
    const at::Tensor& map) {
  check_layercam_backward_inputs(grad_map, gradient, activation, map);
  at::Tensor grad_gradient = at::empty(gradient.sizes(), gradient.options());
  at::Tensor grad_activation = at::empty(gradient.sizes(), gradient.options());
  if (gradient.numel() == 0) {
    return {grad_gradient, grad_activation};
  }
  const at::Tensor upstream = grad_map.contiguous();
  const at::Tensor m = map.contiguous();
  const at::Tensor g = gradient.contiguous();
  const at::Tensor a = activation.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gradient.scalar_type(), "layercam_backward", [&] {
    layercam_backward_kernel<scalar_t>(
        upstream.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(),
        m.const_data_ptr<scalar_t>(),
        grad_gradient.mutable_data_ptr<scalar_t>(),
        grad_activation.mutable_data_ptr<scalar_t>(),
        gradient.size(1),
        gradient.size(2) * gradient.size(3),
        gradient.size(0) * gradient.size(1));
  });
  return {grad_gradient, grad_activation};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CPU, m) {
  m.impl("layercam", &layercam_cpu);
  m.impl("layercam_backward", &layercam_backward_cpu);
}

}  // namespace fastxai
