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
// lora_vec: the same term for the seed's layouts (A (k, r) and B (r, n) row-major, k and n whole
// 16-byte packs, r = 8 or 16), one row per block, every access a 16-byte pack: a thread takes one
// pack of x with the V rows of A it meets, and one pack of output columns with the r rows of B
// over them, and issues all of those loads before any arithmetic, so the kernel waits on memory
// once. The r sums of a row are spread over the warp by a halving butterfly (r/2 + r/4 + … + 1
// shuffles, then log2(32/r) on one value: 9 for r = 8, where lora_small shuffles all 8 values
// 5 times) and meet in shared memory (one barrier). Measured at 1×128×{512,1024,2048}, r = 8, on
// an H200 (bench/kernel-lab/loralab.cu): 4.1–5.0 µs of GPU time per launch (bf16) against
// 9.2–11.7 for lora_small, and a launch-and-wait latency of 11.3–13.2 µs against 17.1–19.3
// (an empty kernel: 9.6).
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

// Sums v[0..R) over each group of P consecutive lanes (P a power of two, R ≤ P ≤ 32) by a
// halving butterfly: each step trades half of the values still held with the partner lane, so
// lane l of a group ends with the sum of value (l % P) / (P / R).
template <int R, int P>
__device__ __forceinline__ float group_sum_spread(float (&v)[R], int lane) {
    static_assert(R <= P && P <= 32 && (P & (P - 1)) == 0 && (R & (R - 1)) == 0, "powers of two, R <= P <= 32");
#pragma unroll
    for (int cnt = R, o = P / 2; cnt > 1; cnt >>= 1, o >>= 1) {
        const bool upper = lane & o;
#pragma unroll
        for (int i = 0; i < cnt / 2; i++) {
            const float keep = upper ? v[i + cnt / 2] : v[i];
            const float give = upper ? v[i] : v[i + cnt / 2];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, give, o);
        }
    }
    float s = v[0];
#pragma unroll
    for (int o = P / R / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// The host guarantees: A (k, R) and B (R, n) row-major, k and n multiples of V, k/V and n/V at
// most blockDim.x, every pointer 16-byte aligned, bias null or n elements.
template <typename T, int R>
__device__ void lora_vec(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                         const T* __restrict__ bias, T* __restrict__ y, int k, int n, float scale) {
    constexpr int V = 16 / sizeof(T);  // elements per 16-byte pack
    constexpr int AV = R / V;          // packs per row of A
    static_assert(R % V == 0, "a row of A is whole packs");
    __shared__ __align__(16) float part[32][R];
    const int row = blockIdx.x, tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31, nwarps = blockDim.x >> 5;
    const int kv = k / V, nv = n / V;
    Pack<T, V> bp[R], bias_p;
    if (tid < nv) {
#pragma unroll
        for (int j = 0; j < R; j++) bp[j] = load_raw<T, V>(b + (size_t)j * n + (size_t)tid * V);
        if (bias) bias_p = load_raw<T, V>(bias + (size_t)tid * V);
    }
    float acc[R];
#pragma unroll
    for (int j = 0; j < R; j++) acc[j] = 0.f;
    if (tid < kv) {
        const Pack<T, V> xp = load_raw<T, V>(x + (size_t)row * k + (size_t)tid * V);
        Pack<T, V> ap[V][AV];
#pragma unroll
        for (int e = 0; e < V; e++)
#pragma unroll
            for (int u = 0; u < AV; u++) ap[e][u] = load_raw<T, V>(a + ((size_t)tid * V + e) * R + u * V);
        float xf[V];
        unpack<T, V>(xp, xf);
#pragma unroll
        for (int e = 0; e < V; e++)
#pragma unroll
            for (int u = 0; u < AV; u++) {
                float af[V];
                unpack<T, V>(ap[e][u], af);
#pragma unroll
                for (int q = 0; q < V; q++) acc[u * V + q] += xf[e] * af[q];
            }
    }
    const float s = group_sum_spread<R, 32>(acc, lane);
    if ((lane & (32 / R - 1)) == 0) part[warp][lane / (32 / R)] = s;
    __syncthreads();
    if (tid < nv) {
        float t[R];
#pragma unroll
        for (int j = 0; j < R; j++) t[j] = 0.f;
        for (int w = 0; w < nwarps; w++) {
#pragma unroll
            for (int j = 0; j < R; j += 4) {
                const float4 p = *reinterpret_cast<const float4*>(&part[w][j]);
                t[j] += p.x; t[j + 1] += p.y; t[j + 2] += p.z; t[j + 3] += p.w;
            }
        }
        float o[V];
        if (bias) unpack<T, V>(bias_p, o);
        else
#pragma unroll
            for (int e = 0; e < V; e++) o[e] = 0.f;
#pragma unroll
        for (int j = 0; j < R; j++) {
            float bj[V];
            unpack<T, V>(bp[j], bj);
            const float tj = t[j] * scale;
#pragma unroll
            for (int e = 0; e < V; e++) o[e] += tj * bj[e];
        }
        store<T, V>(y + (size_t)row * n + (size_t)tid * V, o);
    }
}

#define LORA_SMALL_KERNEL(NAME, T, RANK)                                                                       \
    extern "C" __global__ void lora_small_r##RANK##_##NAME(const T* x, const T* a, const T* b, const T* bias, T* y, \
                                                           int m, int k, int r, int n, int rows_per_block,          \
                                                           long long sa0, long long sa1, long long sb0,             \
                                                           long long sb1, float scale) {                            \
        lora_small<T, RANK>(x, a, b, bias, y, m, k, r, n, rows_per_block, sa0, sa1, sb0, sb1, scale);             \
    }
#define LORA_VEC_KERNEL(NAME, T, RANK)                                                                         \
    extern "C" __global__ void lora_vec_r##RANK##_##NAME(const T* x, const T* a, const T* b, const T* bias, T* y,   \
                                                         int k, int n, float scale) {                               \
        lora_vec<T, RANK>(x, a, b, bias, y, k, n, scale);                                                         \
    }
#define LORA_KERNELS(NAME, T, V)                                                                                 \
    LORA_SMALL_KERNEL(NAME, T, 8)                                                                                \
    LORA_SMALL_KERNEL(NAME, T, 16)                                                                               \
    LORA_VEC_KERNEL(NAME, T, 8)                                                                                  \
    LORA_VEC_KERNEL(NAME, T, 16)                                                                                 \
    extern "C" __global__ void set_col_##NAME(T* buf, int rows, int ld, int col, float value) {                 \
        for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x)               \
            buf[(size_t)r * ld + col] = from_f<T>(value);                                                        \
    }
MC_FOR_TYPES(LORA_KERNELS)
