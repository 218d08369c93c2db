// CPU kernels of fastxai::tft_ladder, tft_ladder_out and tft_mask: the masked batch of the TFT
// threshold ladder, out[n * T + t, c] = weight_t(I_n) * x[n, c]
// (csrc/include/fastxai/tft_ladder.h).
//
// The map of tft_ladder is fastxai::scale_maps' (the same kernel, so the same values). The
// masking works on blocks of pixels of one image: for each threshold it fills the block's weights
// once and writes them times each channel, so the image block stays in cache across the T
// thresholds and every output row is written once, in order; batches beyond the caches use
// streaming stores. Percentile mode first finds, per image, the pixel of each muted count's
// stable rank (std::nth_element on unique (value, index) keys: no full sort).
//
// Schedules: tft_mask, and tft_ladder with fewer images than threads, run (image, block) tasks;
// tft_ladder with enough images runs one task per image (map, pivots, all its blocks) in a
// single parallel region.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fastxai/macros.h"
#include "fastxai/tft_checks.h"
#include "fastxai/tft_ladder.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTXAI_STREAMING_STORES 1
#else
#define FASTXAI_STREAMING_STORES 0
#endif

namespace fastxai {
namespace {

// Pixels of one image per task: with T thresholds and C channels a task writes T * C rows of this
// length, and the block's map, weights and image rows stay in L1/L2.
constexpr int64_t kBlockPixels = 2048;
// Output elements per task worth a thread; smaller batches run inline.
constexpr int64_t kElementsPerTask = 1 << 16;
// Batches at least this large are written with streaming stores: they outgrow the caches, so
// ordinary stores would first read every output line in (read-for-ownership), which costs about
// as much as writing it (48 MB: 3.7 ms against 2.7 ms on one thread here).
constexpr int64_t kStreamingBytes = int64_t{16} << 20;

// A pixel's position in the stable sort as a plain integer pair: the value's bits made
// order-preserving (negative floats flipped), -0 taken as +0 and every NaN as the largest key,
// then the pixel index. (key, index) pairs compare exactly like sorts_before in tft_ladder.h, and
// std::nth_element on them runs several times faster than on indices with that comparator.
template <typename scalar_t>
struct SortKey {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  bits_t value;
  int64_t index;

  static SortKey of(scalar_t v, int64_t index) {
    constexpr bits_t sign = bits_t{1} << (8 * sizeof(bits_t) - 1);
    if (v != v) {
      return {~bits_t{0}, index};
    }
    const bits_t bits = std::bit_cast<bits_t>(v == scalar_t(0) ? scalar_t(0) : v);
    return {(bits & sign) ? ~bits : bits | sign, index};
  }
  bool operator<(const SortKey& other) const {
    return value < other.value || (value == other.value && index < other.index);
  }
};

// The stable-rank pivots of percentile mode for one image (see tft_ladder.h): for each threshold,
// the (value, index) key of the pixel of rank floor(q * H * W), or (NaN, H * W) when every pixel is
// muted.
template <typename scalar_t>
void find_pivots(
    const scalar_t* map,
    int64_t pixels,
    const std::vector<int64_t>& muted,
    const std::vector<int64_t>& thresholds_by_muted,
    std::vector<SortKey<scalar_t>>& keys,
    scalar_t* pivot_values,
    int64_t* pivot_indices) {
  for (int64_t i = 0; i < pixels; ++i) {
    keys[i] = SortKey<scalar_t>::of(map[i], i);
  }
  // Thresholds in increasing muted count: each nth_element leaves every key from its pivot on in
  // [k, end), so the next search needs only that range.
  int64_t searched_from = 0;
  for (const int64_t t : thresholds_by_muted) {
    const int64_t k = muted[t];
    if (k >= pixels) {
      pivot_values[t] = std::numeric_limits<scalar_t>::quiet_NaN();
      pivot_indices[t] = pixels;
      continue;
    }
    std::nth_element(keys.begin() + searched_from, keys.begin() + k, keys.end());
    pivot_values[t] = map[keys[k].index];
    pivot_indices[t] = keys[k].index;
    searched_from = k;
  }
}

// static_cast<scalar_t>(keep) through an integer mask of the same width: GCC does not vectorise
// a loop that converts bool to float, and the weight loops below run T times per pixel.
template <typename scalar_t>
inline scalar_t one_if(bool keep) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  constexpr bits_t one = std::bit_cast<bits_t>(scalar_t(1));
  return std::bit_cast<scalar_t>((bits_t{0} - static_cast<bits_t>(keep)) & one);
}

// weight[i] = mask_weight(keep(map[i]), map[i]) for one block of one image and one threshold.
template <bool kSoft, typename scalar_t>
void value_weights(
    const scalar_t* __restrict map,
    int64_t count,
    scalar_t tau,
    scalar_t* __restrict weight) {
  for (int64_t i = 0; i < count; ++i) {
    weight[i] = keep_weight(one_if<scalar_t>(value_keeps(map[i], tau)), map[i], kSoft);
  }
}

// The same in percentile mode, with pixel indices relative to the block in 32 bits (so the loop
// vectorises): the pivot's index is clamped to [-1, count], which orders it alike against every
// pixel of the block.
template <bool kSoft, typename scalar_t>
void rank_weights(
    const scalar_t* __restrict map,
    int64_t first_pixel,
    int64_t count,
    scalar_t pivot_value,
    int64_t pivot_index,
    scalar_t* __restrict weight) {
  const auto local_pivot =
      static_cast<int32_t>(std::clamp<int64_t>(pivot_index - first_pixel, -1, count));
  for (int32_t i = 0; i < static_cast<int32_t>(count); ++i) {
    const bool keep = rank_keeps(map[i], i, pivot_value, local_pivot);
    weight[i] = keep_weight(one_if<scalar_t>(keep), map[i], kSoft);
  }
}

// out[i] = weight[i] * image[i] for one output row.
template <typename scalar_t>
FASTXAI_CPU_CLONES void weigh_row(
    const scalar_t* __restrict weight,
    const scalar_t* __restrict image,
    int64_t count,
    scalar_t* __restrict out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = weight[i] * image[i];
  }
}

template <typename scalar_t>
using RowWriter = void (*)(const scalar_t*, const scalar_t*, int64_t, scalar_t*);

#if FASTXAI_STREAMING_STORES
// weigh_row with non-temporal stores from the first 32-byte aligned element on (AVX2); the
// writer must _mm_sfence() before another thread reads the output.
__attribute__((target("avx2"))) void weigh_row_streaming(
    const float* __restrict weight,
    const float* __restrict image,
    int64_t count,
    float* __restrict out) {
  int64_t i = 0;
  for (; i < count && reinterpret_cast<uintptr_t>(out + i) % 32 != 0; ++i) {
    out[i] = weight[i] * image[i];
  }
  for (; i + 8 <= count; i += 8) {
    const __m256 product = _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_loadu_ps(image + i));
    _mm256_stream_ps(out + i, product);
  }
  for (; i < count; ++i) {
    out[i] = weight[i] * image[i];
  }
}

__attribute__((target("avx2"))) void weigh_row_streaming(
    const double* __restrict weight,
    const double* __restrict image,
    int64_t count,
    double* __restrict out) {
  int64_t i = 0;
  for (; i < count && reinterpret_cast<uintptr_t>(out + i) % 32 != 0; ++i) {
    out[i] = weight[i] * image[i];
  }
  for (; i + 4 <= count; i += 4) {
    const __m256d product = _mm256_mul_pd(_mm256_loadu_pd(weight + i), _mm256_loadu_pd(image + i));
    _mm256_stream_pd(out + i, product);
  }
  for (; i < count; ++i) {
    out[i] = weight[i] * image[i];
  }
}
#endif

// Streaming stores for a batch of `out_bytes` when it pays and the CPU has AVX2.
template <typename scalar_t>
bool use_streaming_stores(int64_t out_bytes) {
#if FASTXAI_STREAMING_STORES
  return out_bytes >= kStreamingBytes && __builtin_cpu_supports("avx2");
#else
  (void)out_bytes;
  return false;
#endif
}

template <typename scalar_t>
RowWriter<scalar_t> row_writer(bool streaming) {
#if FASTXAI_STREAMING_STORES
  if (streaming) {
    return static_cast<RowWriter<scalar_t>>(&weigh_row_streaming);
  }
#endif
  (void)streaming;
  return &weigh_row<scalar_t>;
}

struct BatchLayout {
  int64_t thresholds;
  int64_t channels;
  int64_t pixels;
};

// One task: `count` pixels from `first_pixel` of image `n`, and its thresholds: T taus (value
// mode) or T pivots (percentile mode).
template <typename scalar_t>
struct BlockTask {
  int64_t n;
  int64_t first_pixel;
  int64_t count;
  const scalar_t* map;
  const scalar_t* thresholds;
  const int64_t* pivot_indices;
};

// The T * C output rows of one block: per threshold, its weights once, then weight * image for
// every channel.
template <bool kPercentile, bool kSoft, typename scalar_t>
FASTXAI_CPU_CLONES void write_block(
    const BlockTask<scalar_t>& block,
    const BatchLayout& layout,
    const scalar_t* image_data,
    scalar_t* out_data,
    scalar_t* weight,
    RowWriter<scalar_t> write_row) {
  for (int64_t t = 0; t < layout.thresholds; ++t) {
    if constexpr (kPercentile) {
      rank_weights<kSoft>(
          block.map, block.first_pixel, block.count, block.thresholds[t], block.pivot_indices[t],
          weight);
    } else {
      value_weights<kSoft>(block.map, block.count, block.thresholds[t], weight);
    }
    for (int64_t c = 0; c < layout.channels; ++c) {
      const int64_t image_row = block.n * layout.channels + c;
      const int64_t out_row = (block.n * layout.thresholds + t) * layout.channels + c;
      write_row(
          weight,
          image_data + image_row * layout.pixels + block.first_pixel,
          block.count,
          out_data + out_row * layout.pixels + block.first_pixel);
    }
  }
}

// fastxai::scale_maps through the dispatcher: the ladder's map is exactly the scale_maps op's.
// `keys` picks the kernel: below autograd on the calling thread, or straight to the CPU kernel
// from a worker thread (whose thread-local dispatch state is the default one).
at::Tensor scale_maps(
    const at::Tensor& raw,
    int64_t height,
    int64_t width,
    std::optional<c10::DispatchKeySet> keys = std::nullopt) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastxai::scale_maps", "")
          .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  if (keys.has_value()) {
    return op.redispatch(*keys, raw, height, width);
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(raw, height, width);
}

// The masked batch of one request, over contiguous maps (N, H, W), images and out, in pieces
// that two schedules below combine: an image's percentile pivots, and its output blocks.
template <typename scalar_t>
class MaskedBatch {
 public:
  MaskedBatch(
      const scalar_t* maps,
      const scalar_t* images,
      const at::Tensor& thresholds,
      const LadderShape& shape,
      at::Tensor& out)
      : maps_(maps),
        images_(images),
        out_(out.mutable_data_ptr<scalar_t>()),
        shape_(shape),
        layout_{shape.thresholds, shape.channels, shape.height * shape.width},
        blocks_per_image_((layout_.pixels + kBlockPixels - 1) / kBlockPixels),
        streaming_(use_streaming_stores<scalar_t>(out.numel() * int64_t{sizeof(scalar_t)})),
        write_row_(row_writer<scalar_t>(streaming_)) {
    const int64_t num_thresholds = shape.thresholds;
    if (shape.percentile) {
      // Pivots per image come later; here the muted counts floor(q * H * W) in double precision,
      // and the thresholds in increasing count (find_pivots narrows its search along them).
      const at::Tensor fractions = thresholds.to(at::kDouble).contiguous();
      const double* fraction_data = fractions.const_data_ptr<double>();
      muted_.resize(num_thresholds);
      for (int64_t t = 0; t < num_thresholds; ++t) {
        muted_[t] = muted_count(fraction_data[t], layout_.pixels);
      }
      thresholds_by_muted_.resize(num_thresholds);
      std::iota(thresholds_by_muted_.begin(), thresholds_by_muted_.end(), int64_t{0});
      std::stable_sort(
          thresholds_by_muted_.begin(), thresholds_by_muted_.end(),
          [this](int64_t a, int64_t b) { return muted_[a] < muted_[b]; });
      pivot_values_.resize(shape.n * num_thresholds);
      pivot_indices_.resize(shape.n * num_thresholds);
    } else {
      // Value mode compares with tau in the maps' dtype (the reference's thresholds.to(dtype)).
      // Contiguous in a named tensor: a temporary's data would be freed before it is read.
      const at::Tensor tau_tensor =
          thresholds.to(c10::CppTypeToScalarType<scalar_t>::value).contiguous();
      const scalar_t* tau_data = tau_tensor.const_data_ptr<scalar_t>();
      taus_.assign(tau_data, tau_data + num_thresholds);
    }
  }

  int64_t blocks_per_image() const {
    return blocks_per_image_;
  }

  // Percentile mode: image n's pivots (no-op in value mode). `keys` is scratch of H * W entries.
  void find_image_pivots(int64_t n, std::vector<SortKey<scalar_t>>& keys) {
    if (shape_.percentile) {
      const int64_t offset = n * layout_.thresholds;
      find_pivots(
          maps_ + n * layout_.pixels, layout_.pixels, muted_, thresholds_by_muted_, keys,
          pivot_values_.data() + offset, pivot_indices_.data() + offset);
    }
  }

  // The output rows of image n for pixel blocks [block_begin, block_end), `weight` kBlockPixels
  // long.
  void write_blocks(int64_t n, int64_t block_begin, int64_t block_end, scalar_t* weight) const {
    const int64_t offset = n * layout_.thresholds;
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t first_pixel = b * kBlockPixels;
      const BlockTask<scalar_t> block{
          n,
          first_pixel,
          std::min(kBlockPixels, layout_.pixels - first_pixel),
          maps_ + n * layout_.pixels + first_pixel,
          shape_.percentile ? pivot_values_.data() + offset : taus_.data(),
          shape_.percentile ? pivot_indices_.data() + offset : nullptr};
      const auto write = [&](auto percentile, auto soft) {
        write_block<decltype(percentile)::value, decltype(soft)::value>(
            block, layout_, images_, out_, weight, write_row_);
      };
      if (shape_.percentile) {
        shape_.soft ? write(std::true_type{}, std::true_type{})
                    : write(std::true_type{}, std::false_type{});
      } else {
        shape_.soft ? write(std::false_type{}, std::true_type{})
                    : write(std::false_type{}, std::false_type{});
      }
    }
  }

  // Streaming stores are weakly ordered: each task publishes them before the join.
  void finish_task() const {
#if FASTXAI_STREAMING_STORES
    if (streaming_) {
      _mm_sfence();
    }
#endif
  }

 private:
  const scalar_t* maps_;
  const scalar_t* images_;
  scalar_t* out_;
  LadderShape shape_;
  BatchLayout layout_;
  int64_t blocks_per_image_;
  bool streaming_;
  RowWriter<scalar_t> write_row_;
  std::vector<scalar_t> taus_;
  std::vector<int64_t> muted_;
  std::vector<int64_t> thresholds_by_muted_;
  std::vector<scalar_t> pivot_values_;
  std::vector<int64_t> pivot_indices_;
};

// The batch from finished maps: all pivots, then (image, block) tasks over all threads.
template <typename scalar_t>
void masked_batch_by_blocks(
    const at::Tensor& maps,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    const LadderShape& shape,
    at::Tensor& out) {
  MaskedBatch<scalar_t> batch(
      maps.const_data_ptr<scalar_t>(), images.const_data_ptr<scalar_t>(), thresholds, shape, out);
  const int64_t pixels = shape.height * shape.width;
  if (shape.percentile) {
    at::parallel_for(0, shape.n, 1, [&](int64_t begin, int64_t end) {
      std::vector<SortKey<scalar_t>> keys(pixels);
      for (int64_t n = begin; n < end; ++n) {
        batch.find_image_pivots(n, keys);
      }
    });
  }
  const int64_t blocks = batch.blocks_per_image();
  const int64_t elements_per_task =
      std::max<int64_t>(1, shape.thresholds * shape.channels * kBlockPixels);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / elements_per_task);
  at::parallel_for(0, shape.n * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> weight(kBlockPixels);
    for (int64_t task = begin; task < end; ++task) {
      batch.write_blocks(task / blocks, task % blocks, task % blocks + 1, weight.data());
    }
    batch.finish_task();
  });
}

// The whole ladder with one image per task, in one parallel region: its map (scale_maps' CPU
// kernel, which runs inline inside the region), its pivots, then all its output blocks. A second
// parallel region costs a scheduler time slice when the cores are shared (~10 ms here), more than
// the whole 48 MB ladder; so with at least as many images as threads this schedule is used.
template <typename scalar_t>
void ladder_by_images(
    const at::Tensor& raw,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    const LadderShape& shape,
    at::Tensor& map,
    at::Tensor& out) {
  scalar_t* map_data = map.mutable_data_ptr<scalar_t>();
  MaskedBatch<scalar_t> batch(
      map_data, images.const_data_ptr<scalar_t>(), thresholds, shape, out);
  const int64_t pixels = shape.height * shape.width;
  const c10::DispatchKeySet cpu_kernel(c10::DispatchKey::CPU);
  at::parallel_for(0, shape.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> weight(kBlockPixels);
    std::vector<SortKey<scalar_t>> keys(shape.percentile ? pixels : 0);
    for (int64_t n = begin; n < end; ++n) {
      const at::Tensor image_map =
          scale_maps(raw.narrow(0, n, 1), shape.height, shape.width, cpu_kernel);
      std::copy_n(image_map.const_data_ptr<scalar_t>(), pixels, map_data + n * pixels);
      batch.find_image_pivots(n, keys);
      batch.write_blocks(n, 0, batch.blocks_per_image(), weight.data());
    }
    batch.finish_task();
  });
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
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "tft_mask", [&] {
    masked_batch_by_blocks<scalar_t>(maps_contiguous, images_contiguous, thresholds, shape, out);
  });
}

// The map (N, H, W) of `raw` and the masked batch into `out`, both checked by the caller.
at::Tensor write_ladder(
    const at::Tensor& raw,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    const LadderShape& shape,
    at::Tensor& out) {
  if (out.numel() == 0 || shape.n < at::get_num_threads()) {
    at::Tensor map = scale_maps(raw, shape.height, shape.width);
    write_masked_batch(map, images, thresholds, shape, out);
    return map;
  }
  at::Tensor map = at::empty({shape.n, shape.height, shape.width}, images.options());
  const at::Tensor raw_contiguous = raw.contiguous();
  const at::Tensor images_contiguous = images.contiguous();
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "tft_ladder", [&] {
    ladder_by_images<scalar_t>(raw_contiguous, images_contiguous, thresholds, shape, map, out);
  });
  return map;
}

at::Tensor tft_mask_cpu(
    const at::Tensor& maps,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask) {
  const LadderShape shape =
      check_ladder_inputs("tft_mask", maps, "maps", true, images, thresholds, mode, mask);
  at::Tensor out = at::empty(
      {shape.n * shape.thresholds, shape.channels, shape.height, shape.width}, images.options());
  write_masked_batch(maps, images, thresholds, shape, out);
  return out;
}

at::Tensor tft_ladder_out_cpu(
    const at::Tensor& raw,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask,
    at::Tensor& out) {
  const LadderShape shape =
      check_ladder_inputs("tft_ladder_out", raw, "raw", false, images, thresholds, mode, mask);
  check_ladder_out("tft_ladder_out", out, images, shape);
  return write_ladder(raw, images, thresholds, shape, out);
}

std::tuple<at::Tensor, at::Tensor> tft_ladder_cpu(
    const at::Tensor& raw,
    const at::Tensor& images,
    const at::Tensor& thresholds,
    std::string_view mode,
    std::string_view mask) {
  const LadderShape shape =
      check_ladder_inputs("tft_ladder", raw, "raw", false, images, thresholds, mode, mask);
  at::Tensor out = at::empty(
      {shape.n * shape.thresholds, shape.channels, shape.height, shape.width}, images.options());
  at::Tensor map = write_ladder(raw, images, thresholds, shape, out);
  return {out, map};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CPU, m) {
  m.impl("tft_ladder", &tft_ladder_cpu);
  m.impl("tft_ladder_out", &tft_ladder_out_cpu);
  m.impl("tft_mask", &tft_mask_cpu);
}

}  // namespace fastxai
