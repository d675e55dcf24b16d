// Softmax over the last dimension, forward and backward: one block per row (grid-stride over
// rows), the row held in registers, f32 arithmetic, one read and one write of the data.
// Also the cross-entropy of each row against a target index, which is a softmax in disguise.
#include "common.cuh"

// Packs per thread held in registers (`softmax_fwd_packs`, `softmax_bwd_packs` and `CE_PACKS`
// in softmax.rs). The forward pass keeps 4 packs whatever the type: 32 elements of a 16-bit row,
// whose blocks are then half as many threads (128 for a row of 4096) with fewer warps to reduce
// over: 68.5 µs against 69.8 with 16 elements at 8×2048×4096 bf16 (H200). The backward pass
// holds x and dy and keeps 16 elements. The cross-entropy keeps 4 packs, since its rows are a
// vocabulary long and should stay in registers up to 4096 packs.
constexpr int RSF = 4;
template <int V> constexpr int RSB = row_packs(V, 16, 4);
constexpr int RCE = 4;

// Every reduction of these kernels takes at most two values.
typedef RowReducer<2> Reducer;

// The row's maximum, reduced over the block (every thread gets it). When `cached`, the row is
// left in `v` (pack r of this thread at v[r]) and, if `dy` is given, the same packs of `dy` in
// `g`, loaded in the same loop so that all of a thread's loads are in flight together;
// otherwise the row is only read (and `dy` not at all).
template <typename T, int V, int R>
__device__ __forceinline__ float load_row_max(const T* __restrict__ x, float (&v)[R][V], const T* __restrict__ dy, float (&g)[R][V],
                              int nv, bool cached, Reducer& red) {
    float mx = -INFINITY;
    if (cached) {
        // Every load issued before the first use, unconditionally (a pack past the row loads
        // the row's first pack, never used): loads under a per-pack guard, each converted in
        // its own guarded block, made the thread wait for one pack before the next pack's load
        // was issued (softmax bf16 at 8×2048×4096, H200: 80.0 µs so, see BENCHMARKS.md).
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            const size_t at = (size_t)(i < nv ? i : 0) * V;
            load<T, V>(x + at, v[r]);
            if (dy) load<T, V>(dy + at, g[r]);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) mx = fmaxf(mx, v[r][k]);
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V];
            load<T, V>(x + (size_t)i * V, t);
#pragma unroll
            for (int k = 0; k < V; k++) mx = fmaxf(mx, t[k]);
        }
    }
    return red.reduce1(mx, MaxOp(), -INFINITY);
}

// Σ e^(x − mx) over the row, reduced over the block. When `cached`, the packs in `v` are
// replaced by their exponentials on the way; otherwise the row is read again.
template <typename T, int V, int R>
__device__ __forceinline__ float exp_sum(const T* __restrict__ x, float (&v)[R][V], int nv, bool cached, float mx, Reducer& red) {
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
    return red.reduce1(s, SumOp(), 0.f);
}

template <typename T, int V>
__device__ void softmax_fwd_row(const T* __restrict__ x, T* __restrict__ y, int n, Reducer& red) {
    const int nv = n / V;
    constexpr int R = RSF;
    const bool cached = nv <= R * (int)blockDim.x;
    float v[R][V];
    const float mx = load_row_max<T, V, R>(x, v, nullptr, v, nv, cached, red);
    const float s = exp_sum<T, V, R>(x, v, nv, cached, mx, red);
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
__device__ void softmax_bwd_row(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int n, Reducer& red) {
    const int nv = n / V;
    constexpr int R = RSB<V>;
    const bool cached = nv <= R * (int)blockDim.x;
    float xv[R][V], gv[R][V];
    const float mx = load_row_max<T, V, R>(x, xv, dy, gv, nv, cached, red);
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
    red.reduce<2>(sums, SumOp(), 0.f);
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
__device__ void ce_fwd_row(const T* __restrict__ x, unsigned t, float* __restrict__ loss, int n, Reducer& red) {
    const int nv = n / V;
    constexpr int R = RCE;
    const bool cached = nv <= R * (int)blockDim.x;
    float v[R][V];
    const float mx = load_row_max<T, V, R>(x, v, nullptr, v, nv, cached, red);
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
    red.reduce<2>(sums, SumOp(), 0.f);
    if (threadIdx.x == 0)
        // (mx − x[t]) first: exact when x[t] is the maximum, where the loss is the small ln term
        // alone, which mx + ln(..) − x[t] would round to the spacing of f32 near mx (a relative
        // error of 6e-3 on a row of 3 at loss ≈ 1e-4, measured).
        *loss = t < (unsigned)n ? (mx - to_f(x[t])) + log1pf(sums[0] + (sums[1] - 1.f)) : __int_as_float(0x7fc00000);
}

// dx = g · (softmax(x) - onehot(t)), with g the row's upstream gradient. The target's own
// entry is written as −g · Σ_{j≠t} e_j / s rather than g · (e_t / s − 1): on a peaked row
// e_t / s rounds to 1 and the difference would lose every digit, while the sum of the other
// terms keeps them (a second block reduction, no extra pass over memory when the row is cached).
template <typename T, int V>
__device__ void ce_bwd_row(const T* __restrict__ x, unsigned t, float g, T* __restrict__ dx, int n, Reducer& red) {
    const int nv = n / V;
    constexpr int R = RCE;
    const bool cached = nv <= R * (int)blockDim.x;
    float v[R][V];
    const float mx = load_row_max<T, V, R>(x, v, nullptr, v, nv, cached, red);
    const float s = exp_sum<T, V, R>(x, v, nv, cached, mx, red);
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
    others = red.reduce1(others, SumOp(), 0.f);
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
        __shared__ float shm[2 * 2 * 32];                                                              \
        Reducer red(shm);                                                                              \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            softmax_fwd_row<T, V>(x + (size_t)row * n, y + (size_t)row * n, n, red);                   \
    }                                                                                                  \
    extern "C" __global__ void softmax_bwd_##NAME##_##SUF(const T* x, const T* dy, T* dx, int rows, int n) { \
        __shared__ float shm[2 * 2 * 32];                                                              \
        Reducer red(shm);                                                                              \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            softmax_bwd_row<T, V>(x + (size_t)row * n, dy + (size_t)row * n, dx + (size_t)row * n, n, red); \
    }                                                                                                  \
    extern "C" __global__ void ce_fwd_##NAME##_##SUF(const T* x, const unsigned* t, float* loss, int rows, int n) { \
        __shared__ float shm[2 * 2 * 32];                                                              \
        Reducer red(shm);                                                                              \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            ce_fwd_row<T, V>(x + (size_t)row * n, t[row], loss + row, n, red);                         \
    }                                                                                                  \
    extern "C" __global__ void ce_bwd_##NAME##_##SUF(const T* x, const unsigned* t, const float* g, T* dx, int rows, \
                                                     int n) {                                          \
        __shared__ float shm[2 * 2 * 32];                                                              \
        Reducer red(shm);                                                                              \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                       \
            ce_bwd_row<T, V>(x + (size_t)row * n, t[row], g[row], dx + (size_t)row * n, n, red);       \
    }
#define SOFTMAX_KERNELS(NAME, T, V) SOFTMAX_KERNELS_V(NAME, T, V, v) SOFTMAX_KERNELS_V(NAME, T, 1, s)
MC_FOR_TYPES(SOFTMAX_KERNELS)
