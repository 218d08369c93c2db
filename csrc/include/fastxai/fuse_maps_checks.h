#pragma once

// Input checks of fastxai::fuse_maps, shared by the CPU and CUDA kernels so both reject the same
// inputs with the same messages. Host code only.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>

#include "fastxai/fuse_maps.h"

namespace fastxai {

// Checks raws (L >= 1 maps (N, h_l, w_l), one dtype and device, non-empty maps), the output size
// and the fusion name; returns the fusion.
inline Fusion check_fuse_maps_inputs(
    at::TensorList raws,
    int64_t height,
    int64_t width,
    std::string_view fusion) {
  TORCH_CHECK(
      fusion == "mean" || fusion == "tanh",
      "fuse_maps: fusion must be 'mean' or 'tanh', got '",
      fusion,
      "'");
  TORCH_CHECK(!raws.empty(), "fuse_maps: raws must hold at least one map");
  TORCH_CHECK(height > 0, "fuse_maps: height must be positive, got ", height);
  TORCH_CHECK(width > 0, "fuse_maps: width must be positive, got ", width);
  const at::Tensor& first = raws[0];
  for (size_t l = 0; l < raws.size(); ++l) {
    const at::Tensor& raw = raws[l];
    TORCH_CHECK(
        raw.dim() == 3, "fuse_maps: raws[", l, "] must be (N, h, w), got ", raw.dim(), " dims");
    TORCH_CHECK(
        raw.size(0) == first.size(0),
        "fuse_maps: every map needs the batch size of raws[0] (",
        first.size(0),
        "), raws[",
        l,
        "] has ",
        raw.size(0));
    TORCH_CHECK(
        raw.size(1) > 0 && raw.size(2) > 0,
        "fuse_maps: raws[",
        l,
        "] maps must be non-empty, got (h, w) = (",
        raw.size(1),
        ", ",
        raw.size(2),
        ")");
    TORCH_CHECK(
        raw.scalar_type() == first.scalar_type(),
        "fuse_maps: every map needs the dtype of raws[0] (",
        first.scalar_type(),
        "), raws[",
        l,
        "] is ",
        raw.scalar_type());
    TORCH_CHECK(
        raw.device() == first.device(),
        "fuse_maps: every map needs the device of raws[0] (",
        first.device(),
        "), raws[",
        l,
        "] is on ",
        raw.device());
  }
  return fusion == "mean" ? Fusion::kMean : Fusion::kTanh;
}

}  // namespace fastxai
