// LoRA kernels.
//
// lora_small: the whole LoRA term `y = scale·(x·A)·B (+ bias)` in one launch for small
// problems (the seed's 1×128×{512..2048}, r = 8), where cuBLAS's two launches and their gaps
// dominate. Built for latency: a block takes ROWS ≤ 4 rows (the host picks how many, so that
// the grid fills the GPU) and all its threads split the reduction over k, each loading its
// few x and A values at once (no long dependent loop: with one warp per row, as before, a
// 128-row problem left one warp per SM waiting on a chain of loads, 13–60 µs). The r partial
// sums per row are reduced through shuffles and shared memory (one barrier; every thread then
// sums the warps' partials itself); then every thread writes whole output columns for the
// block's rows, the first of them with a B column loaded before the reduction, so that its
// latency is hidden. f32 accumulation; r ≤ MAXR.
//
// set_col: fills one column of a row-major matrix (the column of ones that carries the bias
// through the small GEMM in the cuBLAS path).
#include "common.cuh"

constexpr int MAX_ROWS = 4;

template <typename T, int MAXR>
__device__ void lora_small(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                           const T* __restrict__ bias, T* __restrict__ y, int m, int k, int r, int n, int rows_per_block,
                           long long sa0, long long sa1, long long sb0, long long sb1, float scale) {
    __shared__ float part[32][MAX_ROWS * MAXR];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int row0 = blockIdx.x * rows_per_block;
    const int rows = min(rows_per_block, m - row0);
    float acc[MAX_ROWS][MAXR];
#pragma unroll
    for (int w = 0; w < MAX_ROWS; w++)
#pragma unroll
        for (int j = 0; j < MAXR; j++) acc[w][j] = 0.f;
    // B's column for this thread's first output column, loaded now: it does not depend on
    // x·A, so its memory latency overlaps the reduction instead of following it.
    const int c0 = threadIdx.x;
    float b0[MAXR];
#pragma unroll
    for (int j = 0; j < MAXR; j++) b0[j] = (j < r && c0 < n) ? to_f(b[j * sb0 + (long long)c0 * sb1]) : 0.f;
#pragma unroll 4
    for (int kk = threadIdx.x; kk < k; kk += blockDim.x) {
        float av[MAXR];
        const T* ak = a + (long long)kk * sa0;
#pragma unroll
        for (int j = 0; j < MAXR; j++) av[j] = j < r ? to_f(ak[j * sa1]) : 0.f;
#pragma unroll
        for (int w = 0; w < MAX_ROWS; w++) {
            if (w < rows) {
                const float xv = to_f(x[(size_t)(row0 + w) * k + kk]);
#pragma unroll
                for (int j = 0; j < MAXR; j++) acc[w][j] += xv * av[j];
            }
        }
    }
#pragma unroll
    for (int w = 0; w < MAX_ROWS; w++) {
        if (w < rows) {
#pragma unroll
            for (int j = 0; j < MAXR; j++) {
                float s = acc[w][j];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (lane == 0) part[warp][w * MAXR + j] = s;
            }
        }
    }
    __syncthreads();
    // Every thread sums the warps' partials itself (broadcast reads): no second barrier.
    float t[MAX_ROWS][MAXR];
#pragma unroll
    for (int w = 0; w < MAX_ROWS; w++)
#pragma unroll
        for (int j = 0; j < MAXR; j++) {
            float s = 0.f;
            if (w < rows && j < r)
                for (int q = 0; q < nwarps; q++) s += part[q][w * MAXR + j];
            t[w][j] = s * scale;
        }
    for (int c = c0; c < n; c += blockDim.x) {
        float bc[MAXR];
#pragma unroll
        for (int j = 0; j < MAXR; j++)
            bc[j] = c == c0 ? b0[j] : (j < r ? to_f(b[j * sb0 + (long long)c * sb1]) : 0.f);
        const float base = bias ? to_f(bias[c]) : 0.f;
#pragma unroll
        for (int w = 0; w < MAX_ROWS; w++) {
            if (w < rows) {
                float s = base;
#pragma unroll
                for (int j = 0; j < MAXR; j++) s += t[w][j] * bc[j];
                y[(size_t)(row0 + w) * n + c] = from_f<T>(s);
            }
        }
    }
}

#define LORA_SMALL_KERNEL(NAME, T, RANK)                                                                       \
    extern "C" __global__ void lora_small_r##RANK##_##NAME(const T* x, const T* a, const T* b, const T* bias, T* y, \
                                                           int m, int k, int r, int n, int rows_per_block,          \
                                                           long long sa0, long long sa1, long long sb0,             \
                                                           long long sb1, float scale) {                            \
        lora_small<T, RANK>(x, a, b, bias, y, m, k, r, n, rows_per_block, sa0, sa1, sb0, sb1, scale);             \
    }
#define LORA_KERNELS(NAME, T, V)                                                                                 \
    LORA_SMALL_KERNEL(NAME, T, 8)                                                                                \
    LORA_SMALL_KERNEL(NAME, T, 16)                                                                               \
    extern "C" __global__ void set_col_##NAME(T* buf, int rows, int ld, int col, float value) {                 \
        for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x)               \
            buf[(size_t)r * ld + col] = from_f<T>(value);                                                        \
    }
MC_FOR_TYPES(LORA_KERNELS)
