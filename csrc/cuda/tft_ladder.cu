// CUDA kernels of fastxai::tft_ladder, tft_ladder_out and tft_mask: the masked batch of the TFT
// threshold ladder, out[n * T + t, c] = weight_t(I_n) * x[n, c]
// (csrc/include/fastxai/tft_ladder.h).
//
// tft_ladder scales the raw CAM with fastxai::scale_maps (its CUDA kernel), then one grid-stride
// kernel writes every output element from its map pixel and image pixel. Percentile mode sorts each
// map with a stable at::sort between the two launches and hands the kernel, per (image,
// threshold), the (value, index) key of the pivot pixel of rank floor(q * H * W).

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>
#include <tuple>

#include "fastxai/tft_checks.h"
#include "fastxai/tft_ladder.h"

namespace fastxai {
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = 65535;

// One thread per output element (grid-stride): out[((n * T + t) * C + c) * HW + p]. The index
// arithmetic runs in `index_t`: 32-bit whenever the batch has fewer than 2**31 elements, because
// the kernel's six divisions and remainders per element cost several times more in 64 bits.
template <typename scalar_t, typename index_t, bool kPercentile, bool kSoft>
__global__ void __launch_bounds__(kThreadsPerBlock) masked_batch_kernel(
    const scalar_t* __restrict__ maps,
    const scalar_t* __restrict__ images,
    const scalar_t* __restrict__ taus,
    const scalar_t* __restrict__ pivot_values,
    const int64_t* __restrict__ pivot_indices,
    scalar_t* __restrict__ out,
    index_t num_thresholds,
    index_t channels,
    index_t pixels,
    index_t total) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const index_t p = i % pixels;
    const index_t row = i / pixels;  // (n * T + t) * C + c
    const index_t c = row % channels;
    const index_t image_threshold = row / channels;  // n * T + t
    const index_t t = image_threshold % num_thresholds;
    const index_t n = image_threshold / num_thresholds;
    const scalar_t value = maps[n * pixels + p];
    bool keep;
    if constexpr (kPercentile) {
      keep = rank_keeps(
          value,
          static_cast<int64_t>(p),
          pivot_values[image_threshold],
          pivot_indices[image_threshold]);
    } else {
      keep = value_keeps(value, taus[t]);
    }
    out[i] = mask_weight(keep, value, kSoft) * images[(n * channels + c) * pixels + p];
  }
}

// Per (image, threshold) pivots of percentile mode, (N, T) each: the key of the pixel of stable
// rank floor(q * H * W), or (NaN, H * W) when every pixel is muted.
std::tuple<at::Tensor, at::Tensor> percentile_pivots(
    const at::Tensor& maps,
    const at::Tensor& thresholds,
    int64_t pixels) {
  const at::Tensor flat = maps.reshape({maps.size(0), pixels});
  const auto [values, order] = flat.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor muted = thresholds.to(at::kDouble)
                               .mul(static_cast<double>(pixels))
                               .floor()
                               .nan_to_num(0.0)
                               .clamp(0, pixels)
                               .to(at::kLong);
  const at::Tensor rank = muted.clamp_max(pixels - 1);
  const at::Tensor everything = muted.eq(pixels).unsqueeze(0);
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  at::Tensor pivot_values = values.index_select(1, rank).masked_fill(everything, kNaN).contiguous();
  at::Tensor pivot_indices =
      order.index_select(1, rank).masked_fill(everything, pixels).contiguous();
  return {pivot_values, pivot_indices};
}

template <typename scalar_t, bool kPercentile, bool kSoft>
void launch_masked_batch(
    const at::Tensor& maps,
    const at::Tensor& images,
    const at::Tensor& taus,
    const at::Tensor& pivot_values,
    const at::Tensor& pivot_indices,
    const LadderShape& shape,
    at::Tensor& out) {
  const int64_t total = out.numel();
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (total + kThreadsPerBlock - 1) / kThreadsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The grid-stride loop's last i + stride must not overflow either: headroom of one grid.
  const int64_t headroom = blocks * kThreadsPerBlock;
  const auto launch = [&](auto index_zero) {
    using index_t = decltype(index_zero);
    masked_batch_kernel<scalar_t, index_t, kPercentile, kSoft>
        <<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
            maps.const_data_ptr<scalar_t>(),
            images.const_data_ptr<scalar_t>(),
            kPercentile ? nullptr : taus.const_data_ptr<scalar_t>(),
            kPercentile ? pivot_values.const_data_ptr<scalar_t>() : nullptr,
            kPercentile ? pivot_indices.const_data_ptr<int64_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(),
            static_cast<index_t>(shape.thresholds),
            static_cast<index_t>(shape.channels),
            static_cast<index_t>(shape.height * shape.width),
            static_cast<index_t>(total));
  };
  if (total + headroom <= std::numeric_limits<int32_t>::max()) {
    launch(int32_t{0});
  } else {
    launch(int64_t{0});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Writes the masked batch of `maps` (N, H, W) into `out`, which the caller has checked.
void write_masked_batch(
    const at::Tensor& maps,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    const LadderShape& shape,
    at::Tensor& out) {
  if (out.numel() == 0) {
    return;
  }
  const at::Tensor maps_contiguous = maps.contiguous();
  const at::Tensor images_contiguous = images.contiguous();
  at::Tensor taus;
  at::Tensor pivot_values;
  at::Tensor pivot_indices;
  if (shape.percentile) {
    std::tie(pivot_values, pivot_indices) =
        percentile_pivots(maps_contiguous, thresholds, shape.height * shape.width);
  } else {
    taus = thresholds.to(maps.scalar_type()).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "tft_mask", [&] {
    const auto launch = [&](auto percentile, auto soft) {
      launch_masked_batch<scalar_t, decltype(percentile)::value, decltype(soft)::value>(
          maps_contiguous, images_contiguous, taus, pivot_values, pivot_indices, shape, out);
    };
    if (shape.percentile) {
      shape.soft ? launch(std::true_type{}, std::true_type{})
                 : launch(std::true_type{}, std::false_type{});
    } else {
      shape.soft ? launch(std::false_type{}, std::true_type{})
                 : launch(std::false_type{}, std::false_type{});
    }
  });
}

// fastxai::scale_maps, through the dispatcher (its CUDA kernel), below autograd.
at::Tensor scale_maps(const at::Tensor& raw, int64_t height, int64_t width) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastxai::scale_maps", "")
          .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(raw, height, width);
}

at::Tensor tft_mask_cuda(
    const at::Tensor& maps,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask) {
  const LadderShape shape =
      check_ladder_inputs("tft_mask", maps, "maps", true, images, thresholds, mode, mask);
  const c10::cuda::CUDAGuard device_guard(images.device());
  at::Tensor out = at::empty(
      {shape.n * shape.thresholds, shape.channels, shape.height, shape.width}, images.options());
  write_masked_batch(maps, images, thresholds, shape, out);
  return out;
}

at::Tensor tft_ladder_out_cuda(
    const at::Tensor& raw,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask,
    at::Tensor& out) {
  const LadderShape shape =
      check_ladder_inputs("tft_ladder_out", raw, "raw", false, images, thresholds, mode, mask);
  check_ladder_out("tft_ladder_out", out, images, shape);
  const c10::cuda::CUDAGuard device_guard(images.device());
  at::Tensor map = scale_maps(raw, shape.height, shape.width);
  write_masked_batch(map, images, thresholds, shape, out);
  return map;
}

std::tuple<at::Tensor, at::Tensor> tft_ladder_cuda(
    const at::Tensor& raw,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask) {
  const LadderShape shape =
      check_ladder_inputs("tft_ladder", raw, "raw", false, images, thresholds, mode, mask);
  const c10::cuda::CUDAGuard device_guard(images.device());
  at::Tensor out = at::empty(
      {shape.n * shape.thresholds, shape.channels, shape.height, shape.width}, images.options());
  at::Tensor map = scale_maps(raw, shape.height, shape.width);
  write_masked_batch(map, images, thresholds, shape, out);
  return {out, map};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CUDA, m) {
  m.impl("tft_ladder", &tft_ladder_cuda);
  m.impl("tft_ladder_out", &tft_ladder_out_cuda);
  m.impl("tft_mask", &tft_mask_cuda);
}

}  // namespace fastxai
