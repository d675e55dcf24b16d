// LoRA kernels.
//
// lora_small: the whole LoRA term `y = scale·(x·A)·B (+ bias)` in one launch for small
// problems (the seed's 1×128×{512..2048}, r = 8), where cuBLAS's two launches and their gaps
// dominate. A block of W warps takes W rows: each warp computes its row's r dot products
// (x read once, A from L1, f32 accumulation), the block shares them through shared memory,
// then every thread writes whole output columns for those rows. r ≤ 16.
//
// set_col: fills one column of a row-major matrix (the column of ones that carries the bias
// through the small GEMM in the cuBLAS path).
#include "common.cuh"

constexpr int MAXR = 16;

template <typename T>
__device__ void lora_small(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                           const T* __restrict__ bias, T* __restrict__ y, int m, int k, int r, int n, long long sa0,
                           long long sa1, long long sb0, long long sb1, float scale) {
    __shared__ float t[32][MAXR];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int row0 = blockIdx.x * nwarps;
    const int row = row0 + warp;
    if (row < m) {
        float acc[MAXR];
#pragma unroll
        for (int j = 0; j < MAXR; j++) acc[j] = 0.f;
        const T* xr = x + (size_t)row * k;
        for (int kk = lane; kk < k; kk += 32) {
            const float xv = to_f(xr[kk]);
            const T* ak = a + kk * sa0;
#pragma unroll
            for (int j = 0; j < MAXR; j++)
                if (j < r) acc[j] += xv * to_f(ak[j * sa1]);
        }
#pragma unroll
        for (int j = 0; j < MAXR; j++) {
            if (j < r) {
                float s = acc[j];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (lane == 0) t[warp][j] = s * scale;
            }
        }
    }
    __syncthreads();
    const int rows = min(nwarps, m - row0);
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        float bc[MAXR];
#pragma unroll
        for (int j = 0; j < MAXR; j++) bc[j] = j < r ? to_f(b[j * sb0 + c * sb1]) : 0.f;
        const float base = bias ? to_f(bias[c]) : 0.f;
        for (int w = 0; w < rows; w++) {
            float s = base;
#pragma unroll
            for (int j = 0; j < MAXR; j++)
                if (j < r) s += t[w][j] * bc[j];
            y[(size_t)(row0 + w) * n + c] = from_f<T>(s);
        }
    }
}

#define LORA_KERNELS(NAME, T, V)                                                                                 \
    extern "C" __global__ void lora_small_##NAME(const T* x, const T* a, const T* b, const T* bias, T* y, int m, \
                                                 int k, int r, int n, long long sa0, long long sa1,             \
                                                 long long sb0, long long sb1, float scale) {                   \
        lora_small<T>(x, a, b, bias, y, m, k, r, n, sa0, sa1, sb0, sb1, scale);                                  \
    }                                                                                                            \
    extern "C" __global__ void set_col_##NAME(T* buf, int rows, int ld, int col, float value) {                 \
        for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x)               \
            buf[(size_t)r * ld + col] = from_f<T>(value);                                                        \
    }
MC_FOR_TYPES(LORA_KERNELS)
