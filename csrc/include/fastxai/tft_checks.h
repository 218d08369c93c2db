#pragma once

// Host-side argument checks of the TFT ops (tft_ladder, tft_ladder_out, tft_mask, rpi_select),
// shared by the CPU and CUDA kernels so that both reject the same inputs with the same messages.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>

namespace fastxai {

// Sizes and options of one masked-batch request: the batch is (n * thresholds, channels, height,
// width).
struct LadderShape {
  int64_t n;
  int64_t channels;
  int64_t height;
  int64_t width;
  int64_t thresholds;
  bool percentile;
  bool soft;
};

// `maps` is the raw CAM (N, h, w) of tft_ladder (maps_name "raw", any non-empty h, w) or the
// input-resolution maps (N, H, W) of tft_mask (maps_name "maps").
inline LadderShape check_ladder_inputs(
    std::string_view op,
    const at::Tensor& maps,
    std::string_view maps_name,
    bool maps_at_input_resolution,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask) {
  TORCH_CHECK(
      mode == "value" || mode == "percentile",
      op, ": mode must be 'value' or 'percentile', got '", mode, "'");
  TORCH_CHECK(
      mask == "binary" || mask == "soft",
      op, ": mask must be 'binary' or 'soft', got '", mask, "'");
  TORCH_CHECK(
      images.dim() == 4, op, ": images must be (N, C, H, W), got ", images.dim(), " dims");
  const char* maps_shape = maps_at_input_resolution ? "(N, H, W)" : "(N, h, w)";
  TORCH_CHECK(
      maps.dim() == 3, op, ": ", maps_name, " must be ", maps_shape, ", got ", maps.dim(), " dims");
  TORCH_CHECK(
      thresholds.dim() == 1, op, ": thresholds must be 1-D (T,), got ", thresholds.dim(), " dims");
  TORCH_CHECK(
      at::isFloatingType(thresholds.scalar_type()),
      op, ": thresholds must be floating point, got ", thresholds.scalar_type());
  TORCH_CHECK(
      maps.scalar_type() == images.scalar_type(),
      op, ": ", maps_name, " and images must have the same dtype, got ", maps.scalar_type(),
      " and ", images.scalar_type());
  TORCH_CHECK(
      maps.device() == images.device() && thresholds.device() == images.device(),
      op, ": ", maps_name, ", images and thresholds must be on one device, got ", maps.device(),
      ", ", images.device(), " and ", thresholds.device());
  const LadderShape shape{
      images.size(0),
      images.size(1),
      images.size(2),
      images.size(3),
      thresholds.size(0),
      mode == "percentile",
      mask == "soft"};
  TORCH_CHECK(
      maps.size(0) == shape.n,
      op, ": ", maps_name, " and images must have the same batch size, got ", maps.size(0),
      " and ", shape.n);
  TORCH_CHECK(
      shape.height > 0 && shape.width > 0,
      op, ": images must have a non-empty (H, W), got (", shape.height, ", ", shape.width, ")");
  if (maps_at_input_resolution) {
    TORCH_CHECK(
        maps.size(1) == shape.height && maps.size(2) == shape.width,
        op, ": ", maps_name, " must be (N, H, W) like images, got (", maps.size(1), ", ",
        maps.size(2), ") for (H, W) = (", shape.height, ", ", shape.width, ")");
  } else {
    TORCH_CHECK(
        maps.size(1) > 0 && maps.size(2) > 0,
        op, ": ", maps_name, " maps must be non-empty, got (h, w) = (", maps.size(1), ", ",
        maps.size(2), ")");
  }
  return shape;
}

// The caller's buffer of an out variant: exactly the (N * T, C, H, W) batch, contiguous.
inline void check_ladder_out(std::string_view op, const at::Tensor& out, const at::Tensor& images,
                             const LadderShape& shape) {
  TORCH_CHECK(
      out.dim() == 4 && out.size(0) == shape.n * shape.thresholds &&
          out.size(1) == shape.channels && out.size(2) == shape.height &&
          out.size(3) == shape.width,
      op, ": out must be (N * T, C, H, W) = (", shape.n * shape.thresholds, ", ", shape.channels,
      ", ", shape.height, ", ", shape.width, "), got ", out.sizes());
  TORCH_CHECK(
      out.scalar_type() == images.scalar_type(),
      op, ": out must have the dtype of images (", images.scalar_type(), "), got ",
      out.scalar_type());
  TORCH_CHECK(
      out.device() == images.device(),
      op, ": out must be on the device of images (", images.device(), "), got ", out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
}

// Sizes of one rpi_select request: logits (n * thresholds, classes).
struct SelectShape {
  int64_t n;
  int64_t thresholds;
  int64_t classes;
};

inline SelectShape check_select_inputs(
    std::string_view op,
    const at::Tensor& logits,
    const at::Tensor& classes,
    const at::Tensor& original) {
  TORCH_CHECK(
      logits.dim() == 2, op, ": logits must be (N * T, K), got ", logits.dim(), " dims");
  TORCH_CHECK(classes.dim() == 1, op, ": classes must be (N,), got ", classes.dim(), " dims");
  TORCH_CHECK(
      classes.scalar_type() == at::kLong,
      op, ": classes must be int64 (long), got ", classes.scalar_type());
  TORCH_CHECK(
      original.dim() == 1 && original.size(0) == classes.size(0),
      op, ": original must be (N,) like classes (N = ", classes.size(0), "), got ",
      original.sizes());
  TORCH_CHECK(
      original.scalar_type() == logits.scalar_type(),
      op, ": original must have the dtype of logits (", logits.scalar_type(), "), got ",
      original.scalar_type());
  TORCH_CHECK(
      classes.device() == logits.device() && original.device() == logits.device(),
      op, ": logits, classes and original must be on one device, got ", logits.device(), ", ",
      classes.device(), " and ", original.device());
  const int64_t n = classes.size(0);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(
      n == 0 ? rows == 0 : rows % n == 0,
      op, ": logits must have N * T rows for N = ", n, " images, got ", rows);
  TORCH_CHECK(
      rows == 0 || logits.size(1) > 0, op, ": logits must have at least one class column");
  return {n, n == 0 ? 0 : rows / n, logits.size(1)};
}

}  // namespace fastxai
