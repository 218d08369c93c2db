#pragma once

// FASTXAI_HD marks the shared math in csrc/include/fastxai as callable from host code and, when
// compiled by nvcc, from device code: the CPU and CUDA backends of an op run one definition.
#ifdef __CUDACC__
#define FASTXAI_HD __host__ __device__
#else
#define FASTXAI_HD
#endif
