#pragma once

// FASTXAI_HD marks the shared math in csrc/include/fastxai as callable from host code and, when
// compiled by nvcc, from device code: the CPU and CUDA backends of an op run one definition.
#ifdef __CUDACC__
#define FASTXAI_HD __host__ __device__
#else
#define FASTXAI_HD
#endif

// FASTXAI_CPU_CLONES builds a CPU hot loop twice, for AVX2 and for the baseline ISA, and picks one
// at load time (GCC function multi-versioning): the extension is compiled without -march flags,
// so its vectorised loops are otherwise 128-bit SSE2.
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTXAI_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTXAI_CPU_CLONES
#endif
