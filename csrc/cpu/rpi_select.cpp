// CPU kernel of fastxai::rpi_select: per image, the class probability and RPI curve of its T ladder
// rows and the first threshold that maximises it (csrc/include/fastxai/rpi_select.h), one image per task.
//
// Each row is read twice (its max, then the sum of exp(l - max)) and nothing of size K is written:
// the probability of the explained class is exp(l_c - m) / sum. The float32 sum is the hot loop
// (K exponentials per row); it uses a polynomial exp that the compiler vectorises, built for AVX2
// and for the baseline ISA on x86-64 GCC, since the scalar libm expf is about 10x slower than
// ATen's vectorised softmax.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "fastxai/macros.h"
#include "fastxai/rpi_select.h"
#include "fastxai/scale_maps.h"
#include "fastxai/tft_checks.h"

namespace fastxai {
namespace {

// Output elements (rows of K logits) per task worth a thread.
constexpr int64_t kLogitsPerTask = 1 << 14;
// Partial sums of the float32 exp loop: independent accumulators the compiler maps to vector
// lanes.
constexpr int kLanes = 8;

// exp(x) for x <= 0 and not NaN (x = l - max l of a row with a finite max), within 1e-7 relative:
// Cephes' expf polynomial after the reduction x = n ln2 + r, |r| <= ln2 / 2. Below -87.3 (where
// 2^n leaves the normal range) it returns 0; exp(x) < 1.2e-38 there. Written without branches
// or libm calls, so loops over it vectorise.
inline float exp_nonpositive(float x) {
  constexpr uint32_t kLowestBits = 0xC2AE999Au;  // -87.3f; larger bits are more negative floats
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  // All ones where x >= -87.3, zeros below: the result is masked, not branched on (a branch, even
  // a float select, keeps GCC from vectorising the loop).
  const uint32_t in_range = 0u - static_cast<uint32_t>(bits <= kLowestBits);
  x = std::bit_cast<float>(std::min(bits, kLowestBits));
  // Round x / ln2 to the nearest integer by adding and removing 1.5 * 2^23.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = n * -0.693145751953125f + x;  // ln2 split into a 16-bit head, exact times n ...
  r = n * -1.428606765330187045e-06f + r;  // ... and its tail
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_to_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(p * two_to_n) & in_range);
}

// max_j row[j], NaN when the row holds a NaN. A float max needs a compare-and-select, which GCC
// does not vectorise here; the max of order-preserving integer keys (the bits of a negative float
// with the magnitude bits flipped) vectorises.
FASTXAI_CPU_CLONES float float_row_max(const float* __restrict row, int64_t k) {
  int32_t best_key = std::numeric_limits<int32_t>::min();
  uint32_t has_nan = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t bits = std::bit_cast<int32_t>(row[j]);
    best_key = std::max(best_key, bits ^ ((bits >> 31) & 0x7fffffff));
    has_nan |= static_cast<uint32_t>((bits & 0x7fffffff) > 0x7f800000);
  }
  if (has_nan != 0) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  return std::bit_cast<float>(best_key ^ ((best_key >> 31) & 0x7fffffff));
}

// sum_j exp(row[j] - row_max) for a finite row_max.
FASTXAI_CPU_CLONES float shifted_exp_sum(const float* __restrict row, int64_t k, float row_max) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      lanes[lane] += exp_nonpositive(row[j + lane] - row_max);
    }
  }
  float sum = 0.0f;
  for (; j < k; ++j) {
    sum += exp_nonpositive(row[j] - row_max);
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    sum += lanes[lane];
  }
  return sum;
}

template <typename scalar_t>
scalar_t exact_shifted_exp_sum(const scalar_t* row, int64_t k, scalar_t row_max) {
  scalar_t sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    sum += std::exp(row[j] - row_max);
  }
  return sum;
}

// softmax(row)[c], max-subtracted. A row with a NaN or an infinite max takes the libm path, which
// gives NaN like torch.softmax.
template <typename scalar_t>
scalar_t class_probability(const scalar_t* row, int64_t k, int64_t c) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const float row_max = float_row_max(row, k);
    if (std::isfinite(row_max)) {
      return exp_nonpositive(row[c] - row_max) / shifted_exp_sum(row, k, row_max);
    }
  }
  scalar_t row_max = row[0];
  for (int64_t j = 1; j < k; ++j) {
    row_max = nan_max(row_max, row[j]);
  }
  return std::exp(row[c] - row_max) / exact_shifted_exp_sum(row, k, row_max);
}

template <typename scalar_t>
void rpi_select_kernel(
    const at::Tensor& logits,
    const at::Tensor& classes,
    const at::Tensor& original,
    const SelectShape& shape,
    at::Tensor& rpi,
    at::Tensor& index,
    at::Tensor& probability) {
  const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
  const int64_t* class_data = classes.const_data_ptr<int64_t>();
  const scalar_t* original_data = original.const_data_ptr<scalar_t>();
  scalar_t* rpi_data = rpi.mutable_data_ptr<scalar_t>();
  int64_t* index_data = index.mutable_data_ptr<int64_t>();
  scalar_t* probability_data = probability.mutable_data_ptr<scalar_t>();
  const int64_t num_thresholds = shape.thresholds;
  const int64_t k = shape.classes;
  const int64_t logits_per_image = std::max<int64_t>(1, num_thresholds * k);
  const int64_t grain = std::max<int64_t>(1, kLogitsPerTask / logits_per_image);
  at::parallel_for(0, shape.n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t c = class_data[n];
      const scalar_t p0 = original_data[n];
      scalar_t best = -std::numeric_limits<scalar_t>::infinity();
      int64_t best_t = 0;
      for (int64_t t = 0; t < num_thresholds; ++t) {
        const scalar_t* row = logit_data + (n * num_thresholds + t) * k;
        const scalar_t p = class_probability(row, k, c);
        const scalar_t value = relative_probability_increase(p, p0);
        probability_data[n * num_thresholds + t] = p;
        rpi_data[n * num_thresholds + t] = value;
        if (t == 0 || replaces_maximum(value, best)) {
          best = value;
          best_t = t;
        }
      }
      index_data[n] = num_thresholds == 0 ? -1 : selected_index(best_t, best);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rpi_select_cpu(
    const at::Tensor& logits,
    const at::Tensor& classes,
    const at::Tensor& original) {
  const SelectShape shape = check_select_inputs("rpi_select", logits, classes, original);
  at::Tensor rpi = at::empty({shape.n, shape.thresholds}, logits.options());
  at::Tensor index = at::empty({shape.n}, classes.options());
  at::Tensor probability = at::empty({shape.n, shape.thresholds}, logits.options());
  if (shape.n == 0) {
    return {rpi, index, probability};
  }
  const at::Tensor classes_contiguous = classes.contiguous();
  const int64_t* class_data = classes_contiguous.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < shape.n; ++n) {
    TORCH_CHECK(
        class_data[n] >= 0 && class_data[n] < shape.classes,
        "rpi_select: classes[", n, "] = ", class_data[n], " is out of range for ", shape.classes,
        " classes");
  }
  const at::Tensor logits_contiguous = logits.contiguous();
  const at::Tensor original_contiguous = original.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "rpi_select", [&] {
    rpi_select_kernel<scalar_t>(
        logits_contiguous, classes_contiguous, original_contiguous, shape, rpi, index, probability);
  });
  return {rpi, index, probability};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastxai, CPU, m) {
  m.impl("rpi_select", &rpi_select_cpu);
}

}  // namespace fastxai
