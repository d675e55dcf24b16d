// What every kernel lab shares: error checks for CUDA and cuBLAS calls, and a kernel that fills
// a buffer with reproducible pseudo-random values (a hash of the index and a seed).
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "../../crates/metal-candle/src/ops/cuda/kernels/common.cuh"

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e = (x);                                                                   \
        if (e != cudaSuccess) {                                                                \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
// For cuBLAS calls (the lab includes cublas_v2.h itself).
#define CB(x)                                                                                \
    do {                                                                                     \
        cublasStatus_t s = (x);                                                              \
        if (s != CUBLAS_STATUS_SUCCESS) {                                                    \
            fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, (int)s); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

typedef __nv_bfloat16 bf;

// p[i] = offset + scale · u with u uniform in [−1, 1), from a hash of i and the seed.
template <typename T>
__global__ void fill(T* p, size_t n, uint32_t seed, float scale, float offset = 0.f) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = from_f<T>(offset + scale * ((h >> 8) * (1.f / 16777216.f) * 2.f - 1.f));
    }
}
