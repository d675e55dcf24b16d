// Softmax over the last dimension, forward and backward: one block per row (grid-stride over
// rows), the row held in registers, f32 arithmetic, one read and one write of the data.
// Also the cross-entropy of each row against a target index, which is a softmax in disguise.
#include "common.cuh"

// Packs per thread held in registers: 16 elements for softmax (`softmax_packs` in softmax.rs);
// 4 packs whatever the type for the cross-entropy, whose rows are a vocabulary long and should
// stay in registers up to 4096 packs (`CE_PACKS`).
template <int V> constexpr int RS = row_packs(V, 16, 4);
constexpr int RCE = 4;

// The row's maximum, reduced over the block (every thread gets it). When `cached`, the row is
// left in `v` (pack r of this thread at v[r]) and, if `dy` is given, the same packs of `dy` in
// `g`, loaded in the same loop so that all of a thread's loads are in flight together;
// otherwise the row is only read (and `dy` not at all).
template <typename T, int V, int R>
__device__ float load_row_max(const T* __restrict__ x, float (&v)[R][V], const T* __restrict__ dy, float (&g)[R][V],
                              int nv, bool cached, float* shm) {
    float mx = -INFINITY;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
                load<T, V>(x + (size_t)i * V, v[r]);
                if (dy) load<T, V>(dy + (size_t)i * V, g[r]);
#pragma unroll
                for (int k = 0; k < V; k++) mx = fmaxf(mx, v[r][k]);
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V];
            load<T, V>(x + (size_t)i * V, t);
#pragma unroll
            for (int k = 0; k < V; k++) mx = fmaxf(mx, t[k]);
        }
    }
    return block_reduce1(mx, MaxOp(), -INFINITY, shm);
}

// Σ e^(x − mx) over the row, reduced over the block. When `cached`, the packs in `v` are
// replaced by their exponentials on the way; otherwise the row is read again.
template <typename T, int V, int R>
__device__ float exp_sum(const T* __restrict__ x, float (&v)[R][V], int nv, bool cached, float mx, float* shm) {
    float s = 0.f;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) { v[r][k] = __expf(v[r][k] - mx); s += v[r][k]; }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V];
            load<T, V>(x + (size_t)i * V, t);
#pragma unroll
            for (int k = 0; k < V; k++) s += __expf(t[k] - mx);
        }
    }
    return block_reduce1(s, SumOp(), 0.f, shm);
}

template <typename T, int V>
__device__ void softmax_fwd_row(const T* __restrict__ x, T* __restrict__ y, int n, float* shm) {
    const int nv = n / V;
    constexpr int R = RS<V>;
    const bool cached = nv <= R * (int)blockDim.x;
    float v[R][V];
    const float mx = load_row_max<T, V, R>(x, v, nullptr, v, nv, cached, shm);
    const float s = exp_sum<T, V, R>(x, v, nv, cached, mx, shm);
    const float inv = 1.f / s;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
#pragma unroll
                for (int k = 0; k < V; k++) v[r][k] *= inv;
                store<T, V>(y + (size_t)i * V, v[r]);
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V];
            load<T, V>(x + (size_t)i * V, t);
#pragma unroll
            for (int k = 0; k < V; k++) t[k] = __expf(t[k] - mx) * inv;
            store<T, V>(y + (size_t)i * V, t);
        }
    }
}

// dx = y * (dy - sum(dy * y)), with y recomputed from x in f32 (as the CPU kernel does) rather
// than read back from the stored output: the same bytes move (x instead of y), and for
// bf16/f16 a rounded y makes dy - sum(dy * y) cancel badly on peaked rows (measured: 34%
// relative error on a bf16 row of 3, against 1e-5 for the recomputed y).
template <typename T, int V>
__device__ void softmax_bwd_row(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int n, float* shm) {
    const int nv = n / V;
    constexpr int R = RS<V>;
    const bool cached = nv <= R * (int)blockDim.x;
    float xv[R][V], gv[R][V];
    const float mx = load_row_max<T, V, R>(x, xv, dy, gv, nv, cached, shm);
    // Σ e^(x - max) and Σ e^(x - max)·dy; y·dy summed = the second over the first.
    float se = 0.f, sg = 0.f;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) {
                    xv[r][k] = __expf(xv[r][k] - mx);
                    se += xv[r][k];
                    sg += xv[r][k] * gv[r][k];
                }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[V], b[V];
            load<T, V>(x + (size_t)i * V, a);
            load<T, V>(dy + (size_t)i * V, b);
#pragma unroll
            for (int k = 0; k < V; k++) {
                const float e = __expf(a[k] - mx);
                se += e;
                sg += e * b[k];
            }
        }
    }
    float sums[2] = {se, sg};
    block_reduce<2>(sums, SumOp(), 0.f, shm);
    const float inv = 1.f / sums[0], s = sums[1] * inv;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
#pragma unroll
                for (int k = 0; k < V; k++) xv[r][k] = xv[r][k] * inv * (gv[r][k] - s);
                store<T, V>(dx + (size_t)i * V, xv[r]);
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[V], b[V];
            load<T, V>(x + (size_t)i * V, a);
            load<T, V>(dy + (size_t)i * V, b);
#pragma unroll
            for (int k = 0; k < V; k++) a[k] = __expf(a[k] - mx) * inv * (b[k] - s);
            store<T, V>(dx + (size_t)i * V, a);
        }
    }
}

// Cross-entropy of one row against target index t: loss = logsumexp(x) - x[t] (NaN for a
// target outside the row; the host checks the targets before launching). ln Σ e^(x − max) is
// computed as ln_1p of the sum without one maximal term: ln(s) of a sum s = 1 + ε that
// rounded to 1 would lose ε, which is the whole loss of a confidently right row (the CPU
// kernel does the same). The terms are split into those below 1 and a count of those equal to
// 1 (the maxima), so no single maximal term has to be singled out across threads.
template <typename T, int V>
__device__ void ce_fwd_row(const T* __restrict__ x, unsigned t, float* __restrict__ loss, int n, float* shm) {
    const int nv = n / V;
    constexpr int R = RCE;
    const bool cached = nv <= R * (int)blockDim.x;
    float v[R][V];
    const float mx = load_row_max<T, V, R>(x, v, nullptr, v, nv, cached, shm);
    float sums[2] = {0.f, 0.f};  // Σ e below 1, number of e equal to 1
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float e = __expf(v[r][k] - mx);
                    if (e < 1.f) sums[0] += e; else sums[1] += 1.f;
                }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[V];
            load<T, V>(x + (size_t)i * V, a);
#pragma unroll
            for (int k = 0; k < V; k++) {
                const float e = __expf(a[k] - mx);
                if (e < 1.f) sums[0] += e; else sums[1] += 1.f;
            }
        }
    }
    block_reduce<2>(sums, SumOp(), 0.f, shm);
    if (threadIdx.x == 0)
        *loss = t < (unsigned)n ? mx + log1pf(sums[0] + (sums[1] - 1.f)) - to_f(x[t]) : __int_as_float(0x7fc00000);
}

// dx = g · (softmax(x) - onehot(t)), with g the row's upstream gradient. The target's own
// entry is written as −g · Σ_{j≠t} e_j / s rather than g · (e_t / s − 1): on a peaked row
// e_t / s rounds to 1 and the difference would lose every digit, while the sum of the other
// terms keeps them (a second block reduction, no extra pass over memory when the row is cached).
template <typename T, int V>
__device__ void ce_bwd_row(const T* __restrict__ x, unsigned t, float g, T* __restrict__ dx, int n, float* shm) {
    const int nv = n / V;
    constexpr int R = RCE;
    const bool cached = nv <= R * (int)blockDim.x;
    float v[R][V];
    const float mx = load_row_max<T, V, R>(x, v, nullptr, v, nv, cached, shm);
    const float s = exp_sum<T, V, R>(x, v, nv, cached, mx, shm);
    float others = 0.f;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) others += (unsigned)(i * V + k) == t ? 0.f : v[r][k];
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[V];
            load<T, V>(x + (size_t)i * V, a);
#pragma unroll
            for (int k = 0; k < V; k++) others += (unsigned)(i * V + k) == t ? 0.f : __expf(a[k] - mx);
        }
    }
    others = block_reduce1(others, SumOp(), 0.f, shm);
    const float scale = g / s;
    const float target_grad = -others * scale;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
#pragma unroll
                for (int k = 0; k < V; k++) v[r][k] = (unsigned)(i * V + k) == t ? target_grad : v[r][k] * scale;
                store<T, V>(dx + (size_t)i * V, v[r]);
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float a[V];
            load<T, V>(x + (size_t)i * V, a);
#pragma unroll
            for (int k = 0; k < V; k++) a[k] = (unsigned)(i * V + k) == t ? target_grad : __expf(a[k] - mx) * scale;
            store<T, V>(dx + (size_t)i * V, a);
        }
    }
}

#define SOFTMAX_KERNELS_V(NAME, T, V, SUF)                                                              \
    extern "C" __global__ void softmax_fwd_##NAME##_##SUF(const T* x, T* y, int rows, int n) {          \
        __shared__ float shm[32];                                                                      \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            softmax_fwd_row<T, V>(x + (size_t)row * n, y + (size_t)row * n, n, shm);                   \
    }                                                                                                  \
    extern "C" __global__ void softmax_bwd_##NAME##_##SUF(const T* x, const T* dy, T* dx, int rows, int n) { \
        __shared__ float shm[64];                                                                      \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            softmax_bwd_row<T, V>(x + (size_t)row * n, dy + (size_t)row * n, dx + (size_t)row * n, n, shm); \
    }                                                                                                  \
    extern "C" __global__ void ce_fwd_##NAME##_##SUF(const T* x, const unsigned* t, float* loss, int rows, int n) { \
        __shared__ float shm[64];                                                                      \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            ce_fwd_row<T, V>(x + (size_t)row * n, t[row], loss + row, n, shm);                         \
    }                                                                                                  \
    extern "C" __global__ void ce_bwd_##NAME##_##SUF(const T* x, const unsigned* t, const float* g, T* dx, int rows, \
                                                     int n) {                                          \
        __shared__ float shm[32];                                                                      \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            ce_bwd_row<T, V>(x + (size_t)row * n, t[row], g[row], dx + (size_t)row * n, n, shm);       \
    }
#define SOFTMAX_KERNELS(NAME, T, V) SOFTMAX_KERNELS_V(NAME, T, V, v) SOFTMAX_KERNELS_V(NAME, T, 1, s)
MC_FOR_TYPES(SOFTMAX_KERNELS)
