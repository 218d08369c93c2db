// CPU kernel of fastxai::scale_maps: M = mm(up(mm(relu(raw)))) per map, fused.
//
// Per map, the low-resolution half is cheap: relu + min/max, the scaled map mm(relu(raw)) (h, w),
// and its column-interpolated rows (h, W). Each output row is then one blend of two of those rows,
// written while tracking the output min/max, and rescaled in place: the output is the only
// full-resolution buffer. Many maps run one map per task; a few large maps split their rows.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "fastxai/scale_maps.h"
#include "low_res_maps.h"

namespace fastxai {
namespace {

using cpu::axis_taps;
using cpu::MinMax;
using cpu::prepare_low_res;

// Output pixels per task worth a thread; smaller work runs inline.
constexpr int64_t kPixelsPerTask = 1 << 15;

// Output rows [y_begin, y_end) of one map: blends of two rows of `cols`. Returns their min/max.
template <typename scalar_t>
MinMax<scalar_t> upsample_rows(
    const scalar_t* cols,
    int64_t out_width,
    const std::vector<LinearTaps<scalar_t>>& y_taps,
    int64_t y_begin,
    int64_t y_end,
    scalar_t* out) {
  MinMax<scalar_t> range = MinMax<scalar_t>::empty();
  for (int64_t y = y_begin; y < y_end; ++y) {
    const LinearTaps<scalar_t>& t = y_taps[y];
    const scalar_t* top = cols + t.i0 * out_width;
    const scalar_t* bottom = cols + t.i1 * out_width;
    scalar_t* out_row = out + y * out_width;
    for (int64_t x = 0; x < out_width; ++x) {
      const scalar_t v = blend(top[x], bottom[x], t.w0, t.w1);
      out_row[x] = v;
      range.lo = nan_min(range.lo, v);
      range.hi = nan_max(range.hi, v);
    }
  }
  return range;
}

template <typename scalar_t>
void rescale_rows(
    scalar_t* out,
    int64_t out_width,
    int64_t y_begin,
    int64_t y_end,
    MinMax<scalar_t> range) {
  const scalar_t denominator = min_max_denominator(range.lo, range.hi);
  scalar_t* first = out + y_begin * out_width;
  const int64_t count = (y_end - y_begin) * out_width;
  for (int64_t i = 0; i < count; ++i) {
    first[i] = min_max_scale(first[i], range.lo, denominator);
  }
}

template <typename scalar_t>
void scale_maps_kernel(const at::Tensor& raw, at::Tensor& out) {
  const int64_t num_maps = raw.size(0);
  const int64_t in_height = raw.size(1);
  const int64_t in_width = raw.size(2);
  const int64_t out_height = out.size(1);
  const int64_t out_width = out.size(2);
  const int64_t in_pixels = in_height * in_width;
  const int64_t out_pixels = out_height * out_width;
  const scalar_t* raw_data = raw.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();

  const auto x_taps = axis_taps<scalar_t>(in_width, out_width);
  const auto y_taps = axis_taps<scalar_t>(in_height, out_height);
  const int64_t scratch_size = in_pixels + in_height * out_width;

  // Fewer maps than threads would leave threads idle: then large maps split their rows instead,
  // one map after another.
  const bool split_rows = num_maps < at::get_num_threads() && out_pixels >= 2 * kPixelsPerTask;
  if (!split_rows) {
    const int64_t maps_per_task =
        std::max<int64_t>(1, kPixelsPerTask / (out_pixels + scratch_size));
    at::parallel_for(0, num_maps, maps_per_task, [&](int64_t map_begin, int64_t map_end) {
      std::vector<scalar_t> scratch(scratch_size);
      scalar_t* low = scratch.data();
      scalar_t* cols = low + in_pixels;
      for (int64_t n = map_begin; n < map_end; ++n) {
        scalar_t* out_map = out_data + n * out_pixels;
        prepare_low_res(raw_data + n * in_pixels, in_height, in_width, x_taps, low, cols);
        const auto range = upsample_rows(cols, out_width, y_taps, 0, out_height, out_map);
        rescale_rows(out_map, out_width, 0, out_height, range);
      }
    });
    return;
  }

  std::vector<scalar_t> scratch(scratch_size);
  scalar_t* low = scratch.data();
  scalar_t* cols = low + in_pixels;
  const int64_t rows_per_task = std::max<int64_t>(1, kPixelsPerTask / out_width);
  for (int64_t n = 0; n < num_maps; ++n) {
    scalar_t* out_map = out_data + n * out_pixels;
    prepare_low_res(raw_data + n * in_pixels, in_height, in_width, x_taps, low, cols);
    const auto range = at::parallel_reduce(
        0,
        out_height,
        rows_per_task,
        MinMax<scalar_t>::empty(),
        [&](int64_t y_begin, int64_t y_end, MinMax<scalar_t> /*identity*/) {
          return upsample_rows(cols, out_width, y_taps, y_begin, y_end, out_map);
        },
        [](MinMax<scalar_t> a, MinMax<scalar_t> b) { return a.merged(b); });
    at::parallel_for(0, out_height, rows_per_task, [&](int64_t y_begin, int64_t y_end) {
      rescale_rows(out_map, out_width, y_begin, y_end, range);
    });
  }
}

at::Tensor scale_maps_cpu(const at::Tensor& raw, int64_t height, int64_t width) {
  TORCH_CHECK(raw.dim() == 3, "scale_maps: raw must be (N, h, w), got ", raw.dim(), " dims");
  TORCH_CHECK(height > 0, "scale_maps: height must be positive, got ", height);
  TORCH_CHECK(width > 0, "scale_maps: width must be positive, got ", width);
  TORCH_CHECK(
      raw.size(1) > 0 && raw.size(2) > 0,
      "scale_maps: raw maps must be non-empty, got (h, w) = (",
      raw.size(1),
      ", ",
      raw.size(2),
      ")");
  at::Tensor out = at::empty({raw.size(0), height, width}, raw.options());
  if (raw.size(0) == 0) {
    return out;
  }
  const at::Tensor raw_contiguous = raw.contiguous();
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "scale_maps", [&] {
    scale_maps_kernel<scalar_t>(raw_contiguous, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CPU, m) {
  m.impl("scale_maps", &scale_maps_cpu);
}

}  // namespace fastxai
