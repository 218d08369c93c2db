// CPU kernel of fastxai::fuse_maps: L layers' raw maps -> one fused (N, H, W) map per image.
//
// Per image, every layer's low-resolution half is prepared first: mm(relu(raw_l)) (h_l, w_l) and
// its rows interpolated along x to the output width (h_l, W). An output row is then, per layer,
// one blend of two of those rows folded into the output row (fuse_maps.h), so the (L, H, W) stack
// never exists. tanh fusion first needs each layer's upsampled range, one more blend pass without
// stores, and takes its tanh from ATen over chunks of rows. The output is min-max scaled in
// place. Many images run one image per task; a few large ones split their rows across threads.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tanh.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string_view>
#include <vector>

#include "fastxai/fuse_maps.h"
#include "fastxai/fuse_maps_checks.h"
#include "low_res_maps.h"

namespace fastxai {
namespace {

using cpu::axis_taps;
using cpu::MinMax;

// Output pixels (times layers) per task worth a thread; smaller work runs inline.
constexpr int64_t kPixelsPerTask = 1 << 15;
// tanh arguments per call of ATen's tanh: cache-resident, and its call cost (~us) amortised.
constexpr int64_t kTanhChunk = 1 << 14;

// One layer: its contiguous raw maps, taps, and where its scratch starts in an image's scratch.
template <typename scalar_t>
struct Layer {
  const scalar_t* raw;
  int64_t height;
  int64_t width;
  std::vector<LinearTaps<scalar_t>> y_taps;
  std::vector<LinearTaps<scalar_t>> x_taps;
  int64_t scratch_offset;  // low (height * width), then cols (height * W)
};

// Per image and layer: the range of up_l and tanh's divisor (tanh fusion only).
template <typename scalar_t>
struct UpRange {
  scalar_t lo;
  scalar_t den;
  scalar_t peak;
};

// low = mm(relu(raw)) of one image of one layer, then cols: its rows interpolated along x.
template <typename scalar_t>
void prepare_layer(
    const Layer<scalar_t>& layer,
    int64_t n,
    int64_t /*out_width: the taps know it*/,
    scalar_t* scratch) {
  const int64_t in_pixels = layer.height * layer.width;
  scalar_t* low = scratch + layer.scratch_offset;
  cpu::prepare_low_res(
      layer.raw + n * in_pixels, layer.height, layer.width, layer.x_taps, low, low + in_pixels);
}

template <typename scalar_t>
const scalar_t* layer_cols(const Layer<scalar_t>& layer, const scalar_t* scratch) {
  return scratch + layer.scratch_offset + layer.height * layer.width;
}

// (min, max) of up_l over output rows [y_begin, y_end), computed and dropped.
template <typename scalar_t>
MinMax<scalar_t> upsampled_range(
    const Layer<scalar_t>& layer,
    const scalar_t* scratch,
    int64_t out_width,
    int64_t y_begin,
    int64_t y_end) {
  const scalar_t* cols = layer_cols(layer, scratch);
  MinMax<scalar_t> range = MinMax<scalar_t>::empty();
  for (int64_t y = y_begin; y < y_end; ++y) {
    const LinearTaps<scalar_t>& t = layer.y_taps[y];
    const scalar_t* top = cols + t.i0 * out_width;
    const scalar_t* bottom = cols + t.i1 * out_width;
    for (int64_t x = 0; x < out_width; ++x) {
      const scalar_t v = blend(top[x], bottom[x], t.w0, t.w1);
      range.lo = nan_min(range.lo, v);
      range.hi = nan_max(range.hi, v);
    }
  }
  return range;
}

// Rows of `out_map` hold fused values before the final min-max: fold them into (min, max).
template <typename scalar_t>
void finish_row(
    Fusion fusion,
    int64_t num_layers,
    scalar_t* out_row,
    int64_t out_width,
    MinMax<scalar_t>& range) {
  for (int64_t x = 0; x < out_width; ++x) {
    const scalar_t v = fuse_finish(fusion, out_row[x], num_layers);
    out_row[x] = v;
    range.lo = nan_min(range.lo, v);
    range.hi = nan_max(range.hi, v);
  }
}

// Mean fusion of output rows [y_begin, y_end), before the final min-max; returns their
// (min, max). Each layer's blended row is folded straight into the output row.
template <typename scalar_t>
MinMax<scalar_t> fuse_rows_mean(
    const std::vector<Layer<scalar_t>>& layers,
    const scalar_t* scratch,
    int64_t out_width,
    int64_t y_begin,
    int64_t y_end,
    scalar_t* out_map) {
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  MinMax<scalar_t> range = MinMax<scalar_t>::empty();
  for (int64_t y = y_begin; y < y_end; ++y) {
    scalar_t* out_row = out_map + y * out_width;
    std::fill(out_row, out_row + out_width, fuse_identity<scalar_t>(Fusion::kMean));
    for (const Layer<scalar_t>& layer : layers) {
      const scalar_t* cols = layer_cols(layer, scratch);
      const LinearTaps<scalar_t>& t = layer.y_taps[y];
      const scalar_t* top = cols + t.i0 * out_width;
      const scalar_t* bottom = cols + t.i1 * out_width;
      for (int64_t x = 0; x < out_width; ++x) {
        const scalar_t up = blend(top[x], bottom[x], t.w0, t.w1);
        out_row[x] = fuse_accumulate(Fusion::kMean, out_row[x], up);
      }
    }
    finish_row(Fusion::kMean, num_layers, out_row, out_width, range);
  }
  return range;
}

// tanh fusion of output rows [y_begin, y_end), as fuse_rows_mean. The tanh arguments of every
// layer are written for a chunk of rows (kTanhChunk values), then ATen's vectorised tanh, the
// reference's own kernel, runs over the chunk: std::tanh per pixel made the op 3x slower than
// the eager reference.
template <typename scalar_t>
MinMax<scalar_t> fuse_rows_tanh(
    const std::vector<Layer<scalar_t>>& layers,
    const UpRange<scalar_t>* up_ranges,
    const scalar_t* scratch,
    int64_t out_width,
    int64_t y_begin,
    int64_t y_end,
    scalar_t* out_map) {
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  const int64_t rows_per_chunk =
      std::min(y_end - y_begin, std::max<int64_t>(1, kTanhChunk / (num_layers * out_width)));
  at::Tensor chunk = at::empty(
      {num_layers * rows_per_chunk * out_width},
      at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  scalar_t* terms = chunk.mutable_data_ptr<scalar_t>();
  MinMax<scalar_t> range = MinMax<scalar_t>::empty();
  for (int64_t y0 = y_begin; y0 < y_end; y0 += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, y_end - y0);
    const int64_t layer_stride = rows * out_width;
    for (int64_t l = 0; l < num_layers; ++l) {
      const Layer<scalar_t>& layer = layers[l];
      const UpRange<scalar_t> u = up_ranges[l];
      const scalar_t* cols = layer_cols(layer, scratch);
      for (int64_t r = 0; r < rows; ++r) {
        const LinearTaps<scalar_t>& t = layer.y_taps[y0 + r];
        const scalar_t* top = cols + t.i0 * out_width;
        const scalar_t* bottom = cols + t.i1 * out_width;
        scalar_t* row_terms = terms + l * layer_stride + r * out_width;
        for (int64_t x = 0; x < out_width; ++x) {
          const scalar_t up = blend(top[x], bottom[x], t.w0, t.w1);
          row_terms[x] = tanh_argument(up, u.lo, u.den, u.peak);
        }
      }
    }
    chunk.narrow(0, 0, num_layers * layer_stride).tanh_();
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* out_row = out_map + (y0 + r) * out_width;
      std::fill(out_row, out_row + out_width, fuse_identity<scalar_t>(Fusion::kTanh));
      for (int64_t l = 0; l < num_layers; ++l) {
        const scalar_t* row_terms = terms + l * layer_stride + r * out_width;
        for (int64_t x = 0; x < out_width; ++x) {
          out_row[x] = fuse_accumulate(Fusion::kTanh, out_row[x], row_terms[x]);
        }
      }
      finish_row(Fusion::kTanh, num_layers, out_row, out_width, range);
    }
  }
  return range;
}

template <typename scalar_t>
void rescale_rows(
    scalar_t* out_map,
    int64_t out_width,
    int64_t y_begin,
    int64_t y_end,
    MinMax<scalar_t> range) {
  const scalar_t den = min_max_denominator(range.lo, range.hi);
  scalar_t* first = out_map + y_begin * out_width;
  const int64_t count = (y_end - y_begin) * out_width;
  for (int64_t i = 0; i < count; ++i) {
    first[i] = min_max_scale(first[i], range.lo, den);
  }
}

// One image. `reduce_rows(f)` merges f(y_begin, y_end) -> MinMax over the output rows and
// `for_rows(f)` runs f over them: inline, or split across threads.
template <typename scalar_t, typename ReduceRows, typename ForRows>
void fuse_image(
    const std::vector<Layer<scalar_t>>& layers,
    Fusion fusion,
    int64_t n,
    int64_t out_width,
    scalar_t* scratch,
    UpRange<scalar_t>* up_ranges,
    scalar_t* out_map,
    const ReduceRows& reduce_rows,
    const ForRows& for_rows) {
  for (const Layer<scalar_t>& layer : layers) {
    prepare_layer(layer, n, out_width, scratch);
  }
  if (fusion == Fusion::kTanh) {
    for (size_t l = 0; l < layers.size(); ++l) {
      const MinMax<scalar_t> r = reduce_rows([&](int64_t y_begin, int64_t y_end) {
        return upsampled_range(layers[l], scratch, out_width, y_begin, y_end);
      });
      const scalar_t den = min_max_denominator(r.lo, r.hi);
      up_ranges[l] = {r.lo, den, tanh_peak(r.lo, den, r.hi)};
    }
  }
  const MinMax<scalar_t> range = reduce_rows([&](int64_t y_begin, int64_t y_end) {
    return fusion == Fusion::kMean
        ? fuse_rows_mean(layers, scratch, out_width, y_begin, y_end, out_map)
        : fuse_rows_tanh(layers, up_ranges, scratch, out_width, y_begin, y_end, out_map);
  });
  for_rows([&](int64_t y_begin, int64_t y_end) {
    rescale_rows(out_map, out_width, y_begin, y_end, range);
  });
}

template <typename scalar_t>
void fuse_maps_kernel(
    const std::vector<at::Tensor>& raws,
    Fusion fusion,
    at::Tensor& out) {
  const int64_t num_maps = out.size(0);
  const int64_t out_height = out.size(1);
  const int64_t out_width = out.size(2);
  const int64_t out_pixels = out_height * out_width;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();

  std::vector<Layer<scalar_t>> layers;
  layers.reserve(raws.size());
  int64_t scratch_size = 0;
  for (const at::Tensor& raw : raws) {
    const int64_t h = raw.size(1);
    const int64_t w = raw.size(2);
    layers.push_back(
        {raw.const_data_ptr<scalar_t>(),
         h,
         w,
         axis_taps<scalar_t>(h, out_height),
         axis_taps<scalar_t>(w, out_width),
         scratch_size});
    scratch_size += h * w + h * out_width;
  }
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  const int64_t work_per_map = out_pixels * num_layers + scratch_size;

  const bool split_rows = num_maps < at::get_num_threads() && work_per_map >= 2 * kPixelsPerTask;
  if (!split_rows) {
    const auto inline_reduce = [&](const auto& f) { return f(int64_t{0}, out_height); };
    const auto inline_for = [&](const auto& f) { f(int64_t{0}, out_height); };
    const int64_t maps_per_task = std::max<int64_t>(1, kPixelsPerTask / work_per_map);
    at::parallel_for(0, num_maps, maps_per_task, [&](int64_t map_begin, int64_t map_end) {
      std::vector<scalar_t> scratch(scratch_size);
      std::vector<UpRange<scalar_t>> up_ranges(num_layers);
      for (int64_t n = map_begin; n < map_end; ++n) {
        fuse_image(
            layers,
            fusion,
            n,
            out_width,
            scratch.data(),
            up_ranges.data(),
            out_data + n * out_pixels,
            inline_reduce,
            inline_for);
      }
    });
    return;
  }

  const int64_t rows_per_task =
      std::max<int64_t>(1, kPixelsPerTask / (out_width * (num_layers + 1)));
  const auto parallel_reduce = [&](const auto& f) {
    return at::parallel_reduce(
        0,
        out_height,
        rows_per_task,
        MinMax<scalar_t>::empty(),
        [&](int64_t y_begin, int64_t y_end, MinMax<scalar_t> /*identity*/) {
          return f(y_begin, y_end);
        },
        [](MinMax<scalar_t> a, MinMax<scalar_t> b) { return a.merged(b); });
  };
  const auto parallel_rows = [&](const auto& f) {
    at::parallel_for(0, out_height, rows_per_task, f);
  };
  std::vector<scalar_t> scratch(scratch_size);
  std::vector<UpRange<scalar_t>> up_ranges(num_layers);
  for (int64_t n = 0; n < num_maps; ++n) {
    fuse_image(
        layers,
        fusion,
        n,
        out_width,
        scratch.data(),
        up_ranges.data(),
        out_data + n * out_pixels,
        parallel_reduce,
        parallel_rows);
  }
}

at::Tensor fuse_maps_cpu(
    at::TensorList raws,
    int64_t height,
    int64_t width,
    std::string_view fusion) {
  const Fusion kind = check_fuse_maps_inputs(raws, height, width, fusion);
  at::Tensor out = at::empty({raws[0].size(0), height, width}, raws[0].options());
  if (out.size(0) == 0) {
    return out;
  }
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(raws.size());
  for (const at::Tensor& raw : raws) {
    contiguous.push_back(raw.contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fuse_maps", [&] {
    fuse_maps_kernel<scalar_t>(contiguous, kind, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CPU, m) {
  m.impl("fuse_maps", &fuse_maps_cpu);
}

}  // namespace fastxai
