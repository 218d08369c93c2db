#pragma once

// Input checks of fastxai::layercam and fastxai::mask_priors (and their backwards), shared by the
// CPU and CUDA kernels so both reject the same inputs with the same messages. Host code only.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace fastxai {

inline void check_layercam_inputs(const at::Tensor& gradient, const at::Tensor& activation) {
  TORCH_CHECK(
      gradient.dim() == 4, "layercam: gradient must be (N, C, h, w), got ", gradient.dim(), " dims");
  TORCH_CHECK(
      activation.sizes() == gradient.sizes(),
      "layercam: activation must have the shape of gradient ",
      gradient.sizes(),
      ", got ",
      activation.sizes());
  TORCH_CHECK(
      activation.scalar_type() == gradient.scalar_type(),
      "layercam: activation must have the dtype of gradient (",
      gradient.scalar_type(),
      "), got ",
      activation.scalar_type());
  TORCH_CHECK(
      activation.device() == gradient.device(),
      "layercam: activation must be on the device of gradient (",
      gradient.device(),
      "), got ",
      activation.device());
}

inline void check_layercam_backward_inputs(
    const at::Tensor& grad_map,
    const at::Tensor& gradient,
    const at::Tensor& activation,
    const at::Tensor& map) {
  check_layercam_inputs(gradient, activation);
  const std::vector<int64_t> map_shape = {gradient.size(0), gradient.size(2), gradient.size(3)};
  auto check_map_like = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(
        t.sizes() == c10::IntArrayRef(map_shape),
        "layercam_backward: ",
        name,
        " must be (N, h, w) = ",
        c10::IntArrayRef(map_shape),
        ", got ",
        t.sizes());
    TORCH_CHECK(
        t.scalar_type() == gradient.scalar_type() && t.device() == gradient.device(),
        "layercam_backward: ",
        name,
        " must have the dtype and device of gradient");
  };
  check_map_like(grad_map, "grad_map");
  check_map_like(map, "map");
}

inline void check_mask_priors_inputs(const at::Tensor& p, int64_t neighbours) {
  TORCH_CHECK(p.dim() == 4, "mask_priors: p must be (N, C, H, W), got ", p.dim(), " dims");
  TORCH_CHECK(
      p.size(1) > 0 && p.size(2) > 0 && p.size(3) > 0,
      "mask_priors: p must have at least one pixel per sample, got ",
      p.sizes());
  TORCH_CHECK(
      neighbours == 4 || neighbours == 8,
      "mask_priors: neighbours must be 4 or 8, got ",
      neighbours);
}

inline void check_mask_priors_backward_inputs(
    const at::Tensor& grad_terms,
    const at::Tensor& p,
    int64_t neighbours) {
  check_mask_priors_inputs(p, neighbours);
  TORCH_CHECK(
      grad_terms.dim() == 2 && grad_terms.size(0) == p.size(0) && grad_terms.size(1) == 3,
      "mask_priors_backward: grad_terms must be (N, 3) with N = ",
      p.size(0),
      ", got ",
      grad_terms.sizes());
  TORCH_CHECK(
      grad_terms.scalar_type() == p.scalar_type() && grad_terms.device() == p.device(),
      "mask_priors_backward: grad_terms must have the dtype and device of p");
}

}  // namespace fastxai
