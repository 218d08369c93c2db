#pragma once

// Shared math of fastxai::mask_priors and fastxai::mask_priors_backward.
//
// Per sample n, with P = C * H * W pixels of p in [0, 1]:
//   area         = (1/P) sum p
//   binarisation = (1/P) sum p (1 - p)
//   tv           = mean |vertical differences| + mean |horizontal differences|
//                  [+ (mean |diagonal| + mean |anti-diagonal|) / sqrt(2)   with 8 neighbours]
// A direction without pairs (H = 1 or W = 1) contributes 0.
//
// Each difference is owned by one pixel: pixel (y, x) owns its pairs with (y, x + 1), (y + 1, x),
// (y + 1, x + 1) and (y + 1, x - 1). A neighbour outside the plane is given the centre's value,
// so its difference is 0 both in the sums and in the subgradients: the border needs no other case.
// The subgradient of |d| is sign(d) with sign(0) = 0, as torch.abs's backward.

#include <cmath>
#include <cstdint>

#include "fastxai/macros.h"

namespace fastxai {

constexpr double kInverseSqrt2 = 0.70710678118654752440;

// The 3x3 neighbourhood of one pixel; neighbours outside the plane hold the centre value.
template <typename T>
struct Neighbourhood {
  T up_left, up, up_right;
  T left, centre, right;
  T down_left, down, down_right;
};

// Loads the neighbourhood of column x from three rows. `above` / `below` are null on the first /
// last row. kCheckRows = false is for interior rows (both non-null), kCheckColumns = false for
// interior columns (0 < x < width - 1): loads without conditions, which compilers vectorise.
template <typename T, bool kCheckColumns = true, bool kCheckRows = true>
FASTXAI_HD inline Neighbourhood<T> load_neighbourhood(
    const T* above,
    const T* row,
    const T* below,
    int64_t x,
    int64_t width) {
  const T c = row[x];
  const bool has_left = !kCheckColumns || x > 0;
  const bool has_right = !kCheckColumns || x + 1 < width;
  const bool has_above = !kCheckRows || above != nullptr;
  const bool has_below = !kCheckRows || below != nullptr;
  Neighbourhood<T> n;
  n.centre = c;
  n.left = has_left ? row[x - 1] : c;
  n.right = has_right ? row[x + 1] : c;
  n.up = has_above ? above[x] : c;
  n.up_left = (has_above && has_left) ? above[x - 1] : c;
  n.up_right = (has_above && has_right) ? above[x + 1] : c;
  n.down = has_below ? below[x] : c;
  n.down_left = (has_below && has_left) ? below[x - 1] : c;
  n.down_right = (has_below && has_right) ? below[x + 1] : c;
  return n;
}

template <typename T>
FASTXAI_HD inline T binarisation(T p) {
  return p * (T(1) - p);
}

// d/dp of p (1 - p).
template <typename T>
FASTXAI_HD inline T binarisation_derivative(T p) {
  return T(1) - T(2) * p;
}

// sign(d) with sign(0) = 0 (and 0 for NaN, like torch.sign). A difference of comparisons, not
// nested selects: compilers vectorise it, and random masks would mispredict the branches.
template <typename T>
FASTXAI_HD inline T sign_subgradient(T d) {
  return static_cast<T>(d > T(0)) - static_cast<T>(d < T(0));
}

template <typename T>
FASTXAI_HD inline T absolute(T v) {
  return v < T(0) ? -v : v;
}

// One value per TV direction.
template <typename T>
struct Directions {
  T vertical;
  T horizontal;
  T diagonal;       // (y, x) - (y + 1, x + 1)
  T anti_diagonal;  // (y, x) - (y + 1, x - 1)
};

// |differences| owned by the centre pixel.
template <typename T>
FASTXAI_HD inline Directions<T> owned_absolute_differences(const Neighbourhood<T>& n) {
  return {
      absolute(n.down - n.centre),
      absolute(n.right - n.centre),
      absolute(n.down_right - n.centre),
      absolute(n.down_left - n.centre),
  };
}

// d/d(centre) of the sum of |differences| per direction: the pair the centre owns and the pair
// owned by the neighbour on the other side.
template <typename T>
FASTXAI_HD inline Directions<T> direction_subgradients(const Neighbourhood<T>& n) {
  const T c = n.centre;
  return {
      sign_subgradient(c - n.up) - sign_subgradient(n.down - c),
      sign_subgradient(c - n.left) - sign_subgradient(n.right - c),
      sign_subgradient(c - n.up_left) - sign_subgradient(n.down_right - c),
      sign_subgradient(c - n.up_right) - sign_subgradient(n.down_left - c),
  };
}

// The factors that turn per-sample sums into the three terms: 1/P for area and binarisation, and
// per TV direction its weight over its number of pairs (0 for a direction without pairs, and for
// the diagonals with 4 neighbours).
template <typename acc_t>
struct PriorScales {
  acc_t per_pixel;
  Directions<acc_t> tv;
};

template <typename acc_t>
FASTXAI_HD inline PriorScales<acc_t> prior_scales(
    int64_t channels,
    int64_t height,
    int64_t width,
    bool eight_neighbours) {
  auto inverse_count = [](int64_t count, acc_t weight) {
    return count > 0 ? weight / static_cast<acc_t>(count) : acc_t(0);
  };
  const int64_t vertical_pairs = channels * (height - 1) * width;
  const int64_t horizontal_pairs = channels * height * (width - 1);
  const int64_t diagonal_pairs = channels * (height - 1) * (width - 1);
  const acc_t diagonal_weight = eight_neighbours ? static_cast<acc_t>(kInverseSqrt2) : acc_t(0);
  PriorScales<acc_t> scales;
  scales.per_pixel = acc_t(1) / static_cast<acc_t>(channels * height * width);
  scales.tv = {
      inverse_count(vertical_pairs, acc_t(1)),
      inverse_count(horizontal_pairs, acc_t(1)),
      inverse_count(diagonal_pairs, diagonal_weight),
      inverse_count(diagonal_pairs, diagonal_weight),
  };
  return scales;
}

// Per-sample sums of one pass over p.
template <typename acc_t>
struct PriorSums {
  acc_t area = 0;
  acc_t binarisation = 0;
  Directions<acc_t> tv = {0, 0, 0, 0};

  template <typename other_t>
  FASTXAI_HD void add(const PriorSums<other_t>& other) {
    area += static_cast<acc_t>(other.area);
    binarisation += static_cast<acc_t>(other.binarisation);
    tv.vertical += static_cast<acc_t>(other.tv.vertical);
    tv.horizontal += static_cast<acc_t>(other.tv.horizontal);
    tv.diagonal += static_cast<acc_t>(other.tv.diagonal);
    tv.anti_diagonal += static_cast<acc_t>(other.tv.anti_diagonal);
  }
};

// Adds one pixel's terms; the diagonals only with kEightNeighbours.
template <bool kEightNeighbours, typename T, typename acc_t>
FASTXAI_HD inline void accumulate_pixel(const Neighbourhood<T>& n, PriorSums<acc_t>& sums) {
  const Directions<T> d = owned_absolute_differences(n);
  sums.area += static_cast<acc_t>(n.centre);
  sums.binarisation += static_cast<acc_t>(binarisation(n.centre));
  sums.tv.vertical += static_cast<acc_t>(d.vertical);
  sums.tv.horizontal += static_cast<acc_t>(d.horizontal);
  if (kEightNeighbours) {
    sums.tv.diagonal += static_cast<acc_t>(d.diagonal);
    sums.tv.anti_diagonal += static_cast<acc_t>(d.anti_diagonal);
  }
}

// The three terms [area, binarisation, tv] of one sample from its sums.
template <typename acc_t>
FASTXAI_HD inline void finish_priors(
    const PriorSums<acc_t>& sums,
    const PriorScales<acc_t>& scales,
    acc_t* terms) {
  terms[0] = sums.area * scales.per_pixel;
  terms[1] = sums.binarisation * scales.per_pixel;
  terms[2] = sums.tv.vertical * scales.tv.vertical + sums.tv.horizontal * scales.tv.horizontal +
      sums.tv.diagonal * scales.tv.diagonal + sums.tv.anti_diagonal * scales.tv.anti_diagonal;
}

// Upstream gradient of one sample folded into the scales: dL/dp is then
//   area + binarisation * (1 - 2p) + sum over directions of tv.direction * subgradient.
template <typename acc_t>
struct PriorGradientFactors {
  acc_t area;
  acc_t binarisation;
  Directions<acc_t> tv;
};

template <typename acc_t>
FASTXAI_HD inline PriorGradientFactors<acc_t> prior_gradient_factors(
    acc_t grad_area,
    acc_t grad_binarisation,
    acc_t grad_tv,
    const PriorScales<acc_t>& scales) {
  return {
      grad_area * scales.per_pixel,
      grad_binarisation * scales.per_pixel,
      {grad_tv * scales.tv.vertical,
       grad_tv * scales.tv.horizontal,
       grad_tv * scales.tv.diagonal,
       grad_tv * scales.tv.anti_diagonal},
  };
}

// dL/dp at one pixel.
template <bool kEightNeighbours, typename T, typename acc_t>
FASTXAI_HD inline T pixel_gradient(
    const Neighbourhood<T>& n,
    const PriorGradientFactors<acc_t>& f) {
  const Directions<T> s = direction_subgradients(n);
  acc_t g = f.area + f.binarisation * static_cast<acc_t>(binarisation_derivative(n.centre)) +
      f.tv.vertical * static_cast<acc_t>(s.vertical) +
      f.tv.horizontal * static_cast<acc_t>(s.horizontal);
  if (kEightNeighbours) {
    g += f.tv.diagonal * static_cast<acc_t>(s.diagonal) +
        f.tv.anti_diagonal * static_cast<acc_t>(s.anti_diagonal);
  }
  return static_cast<T>(g);
}

}  // namespace fastxai
