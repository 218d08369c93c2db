#pragma once

// Block-level helpers shared by the CUDA kernels of scale_maps and fuse_maps (one block of
// kThreadsPerBlock threads per map). Needs nan_min / nan_max from fastxai/scale_maps.h.

#include "fastxai/scale_maps.h"

namespace fastxai {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;

// Block-wide NaN-propagating (min, max); every thread gets the result. All threads must call it.
template <typename scalar_t>
__device__ void block_min_max(scalar_t& lo, scalar_t& hi) {
  __shared__ scalar_t warp_lo[kWarpsPerBlock];
  __shared__ scalar_t warp_hi[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    lo = nan_min(lo, __shfl_down_sync(0xffffffffu, lo, offset));
    hi = nan_max(hi, __shfl_down_sync(0xffffffffu, hi, offset));
  }
  if (lane == 0) {
    warp_lo[warp] = lo;
    warp_hi[warp] = hi;
  }
  __syncthreads();
  lo = warp_lo[0];
  hi = warp_hi[0];
  for (int w = 1; w < kWarpsPerBlock; ++w) {
    lo = nan_min(lo, warp_lo[w]);
    hi = nan_max(hi, warp_hi[w]);
  }
  // The shared slots are reused by the next call.
  __syncthreads();
}

}  // namespace cuda
}  // namespace fastxai
