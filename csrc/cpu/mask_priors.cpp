// CPU kernels of fastxai::mask_priors and fastxai::mask_priors_backward.
//
// Forward: one pass over p. Tasks are row bands of one (sample, channel) plane. A row's terms are
// summed in the input precision (in registers: a float-to-double conversion per term would chain
// every addition through a false dependency, 10x slower), rows and bands in double; the bands of
// a sample are folded in a fixed order, so the result does not depend on the number of threads.
// Backward: one pass over p writing dL/dp, with the same bands. Its loops vectorise, and
// FASTXAI_CPU_CLONES adds an AVX2 copy (1.3x faster; an AVX-512 copy measured 10x slower for float
// on this machine).
// The math is csrc/include/fastxai/mask_priors.h, shared with the CUDA kernels.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastxai/cam_prior_checks.h"
#include "fastxai/mask_priors.h"

namespace fastxai {
namespace {

using acc_t = double;

// Pixels per band worth a thread.
constexpr int64_t kPixelsPerBand = 1 << 14;

struct Bands {
  int64_t rows_per_band;
  int64_t per_plane;
};

Bands make_bands(int64_t height, int64_t width) {
  const int64_t rows = std::max<int64_t>(1, kPixelsPerBand / width);
  return {rows, (height + rows - 1) / rows};
}

// Calls visit(neighbourhood, x) for every pixel of row y. Interior columns skip the column checks
// and interior rows the row checks: loads without conditions let the compiler vectorise. Always
// inlined, so that its loops are compiled for the vector ISA of each caller's clone.
template <typename scalar_t, typename Visit>
[[gnu::always_inline]] inline void for_each_pixel_of_row(
    const scalar_t* plane,
    int64_t height,
    int64_t width,
    int64_t y,
    Visit&& visit) {
  const scalar_t* row = plane + y * width;
  const scalar_t* above = y > 0 ? row - width : nullptr;
  const scalar_t* below = y + 1 < height ? row + width : nullptr;
  visit(load_neighbourhood<scalar_t>(above, row, below, 0, width), 0);
  if (above != nullptr && below != nullptr) {
    for (int64_t x = 1; x + 1 < width; ++x) {
      visit(load_neighbourhood<scalar_t, false, false>(above, row, below, x, width), x);
    }
  } else {
    for (int64_t x = 1; x + 1 < width; ++x) {
      visit(load_neighbourhood<scalar_t, false>(above, row, below, x, width), x);
    }
  }
  if (width > 1) {
    visit(load_neighbourhood<scalar_t>(above, row, below, width - 1, width), width - 1);
  }
}

template <bool kEightNeighbours, typename scalar_t>
void mask_priors_forward_kernel(const at::Tensor& p, at::Tensor& terms) {
  const int64_t samples = p.size(0);
  const int64_t channels = p.size(1);
  const int64_t height = p.size(2);
  const int64_t width = p.size(3);
  const Bands bands = make_bands(height, width);
  const int64_t bands_per_sample = channels * bands.per_plane;
  const scalar_t* data = p.const_data_ptr<scalar_t>();

  std::vector<PriorSums<acc_t>> band_sums(samples * bands_per_sample);
  at::parallel_for(0, samples * bands_per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band) {
      const int64_t plane_index = band / bands.per_plane;
      const scalar_t* plane = data + plane_index * height * width;
      const int64_t y_begin = (band % bands.per_plane) * bands.rows_per_band;
      const int64_t y_end = std::min(height, y_begin + bands.rows_per_band);
      PriorSums<acc_t> sums;
      for (int64_t y = y_begin; y < y_end; ++y) {
        PriorSums<scalar_t> row_sums;
        for_each_pixel_of_row(plane, height, width, y, [&](const Neighbourhood<scalar_t>& n, int64_t) {
          accumulate_pixel<kEightNeighbours>(n, row_sums);
        });
        sums.add(row_sums);
      }
      band_sums[band] = sums;
    }
  });

  const PriorScales<acc_t> scales = prior_scales<acc_t>(channels, height, width, kEightNeighbours);
  scalar_t* out = terms.mutable_data_ptr<scalar_t>();
  for (int64_t n = 0; n < samples; ++n) {
    PriorSums<acc_t> total;
    for (int64_t b = 0; b < bands_per_sample; ++b) {
      total.add(band_sums[n * bands_per_sample + b]);
    }
    acc_t sample_terms[3];
    finish_priors(total, scales, sample_terms);
    for (int t = 0; t < 3; ++t) {
      out[n * 3 + t] = static_cast<scalar_t>(sample_terms[t]);
    }
  }
}

// dL/dp on rows [y_begin, y_end) of one plane.
template <bool kEightNeighbours, typename scalar_t>
FASTXAI_CPU_CLONES void backward_rows(
    const scalar_t* plane,
    scalar_t* grad_plane,
    int64_t height,
    int64_t width,
    int64_t y_begin,
    int64_t y_end,
    const PriorGradientFactors<scalar_t>& factors) {
  for (int64_t y = y_begin; y < y_end; ++y) {
    scalar_t* grad_row = grad_plane + y * width;
    for_each_pixel_of_row(plane, height, width, y, [&](const Neighbourhood<scalar_t>& n, int64_t x) {
      grad_row[x] = pixel_gradient<kEightNeighbours>(n, factors);
    });
  }
}

template <bool kEightNeighbours, typename scalar_t>
void mask_priors_backward_kernel(
    const at::Tensor& grad_terms,
    const at::Tensor& p,
    at::Tensor& grad_p) {
  const int64_t samples = p.size(0);
  const int64_t channels = p.size(1);
  const int64_t height = p.size(2);
  const int64_t width = p.size(3);
  const Bands bands = make_bands(height, width);
  const scalar_t* data = p.const_data_ptr<scalar_t>();
  const scalar_t* upstream = grad_terms.const_data_ptr<scalar_t>();
  scalar_t* grad = grad_p.mutable_data_ptr<scalar_t>();

  // The factors are formed in double and applied in the input precision: each pixel's gradient
  // is a sum of a few terms, and float vectors are twice as wide as double ones.
  const PriorScales<acc_t> scales = prior_scales<acc_t>(channels, height, width, kEightNeighbours);
  std::vector<PriorGradientFactors<scalar_t>> factors;
  factors.reserve(samples);
  for (int64_t n = 0; n < samples; ++n) {
    const auto f = prior_gradient_factors<acc_t>(
        upstream[n * 3], upstream[n * 3 + 1], upstream[n * 3 + 2], scales);
    factors.push_back(
        {static_cast<scalar_t>(f.area),
         static_cast<scalar_t>(f.binarisation),
         {static_cast<scalar_t>(f.tv.vertical),
          static_cast<scalar_t>(f.tv.horizontal),
          static_cast<scalar_t>(f.tv.diagonal),
          static_cast<scalar_t>(f.tv.anti_diagonal)}});
  }

  at::parallel_for(0, samples * channels * bands.per_plane, 1, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band) {
      const int64_t plane_index = band / bands.per_plane;
      const int64_t y_begin = (band % bands.per_plane) * bands.rows_per_band;
      backward_rows<kEightNeighbours>(
          data + plane_index * height * width,
          grad + plane_index * height * width,
          height,
          width,
          y_begin,
          std::min(height, y_begin + bands.rows_per_band),
          factors[plane_index / channels]);
    }
  });
}

at::Tensor mask_priors_cpu(const at::Tensor& p, int64_t neighbours) {
  check_mask_priors_inputs(p, neighbours);
  at::Tensor terms = at::empty({p.size(0), 3}, p.options());
  if (p.size(0) == 0) {
    return terms;
  }
  const at::Tensor p_contiguous = p.contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "mask_priors", [&] {
    if (neighbours == 8) {
      mask_priors_forward_kernel<true, scalar_t>(p_contiguous, terms);
    } else {
      mask_priors_forward_kernel<false, scalar_t>(p_contiguous, terms);
    }
  });
  return terms;
}

at::Tensor mask_priors_backward_cpu(
    const at::Tensor& grad_terms,
    const at::Tensor& p,
    int64_t neighbours) {
  check_mask_priors_backward_inputs(grad_terms, p, neighbours);
  at::Tensor grad_p = at::empty(p.sizes(), p.options());
  if (p.size(0) == 0) {
    return grad_p;
  }
  const at::Tensor upstream = grad_terms.contiguous();
  const at::Tensor p_contiguous = p.contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "mask_priors_backward", [&] {
    if (neighbours == 8) {
      mask_priors_backward_kernel<true, scalar_t>(upstream, p_contiguous, grad_p);
    } else {
      mask_priors_backward_kernel<false, scalar_t>(upstream, p_contiguous, grad_p);
    }
  });
  return grad_p;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CPU, m) {
  m.impl("mask_priors", &mask_priors_cpu);
  m.impl("mask_priors_backward", &mask_priors_backward_cpu);
}

}  // namespace fastxai
