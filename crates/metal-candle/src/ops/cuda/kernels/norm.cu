// RMSNorm and LayerNorm over the last dimension, forward and backward.
//
// Forward: one block per row (grid-stride), the row in registers as stored (a 16-bit row takes
// half the registers of its f32 values), f32 statistics, one read of x and one write of y (the
// weight and bias rows come from L1/L2).
// Backward: a grid of G blocks strides over the rows; each thread keeps the weight-gradient
// partial sums of its own columns in registers across all the rows it visits and writes them
// once to a per-block partial row (no atomics); `reduce_cols` then sums the G partial rows.
// The row statistics are recomputed from x, except for LayerNorm's 16-bit rows when the forward
// pass saved them (its `stats` output, mean and 1/std per row, written when gradients are
// tracked). 16-bit rows that fit take `norm_bwd_staged`, which loads the next row while it works
// on the current one.
#include "common.cuh"

// Packs per thread held in registers (`FWD_PACKS`, `bwd_packs` and `STAGED_PACKS` in norm.rs).
// Forward: 4 whatever the type, so a 16-bit row of 4096 takes 128 threads (LayerNorm bf16 at
// 8×2048×4096 on an H200: 70.1 µs against 76.4 with 256 threads). Backward: 8 elements, where
// x, dy and the gradient accumulators all live in registers; 2 packs (16 elements) in the
// staged backward, whose next row waits in shared memory.
constexpr int RF = 4;
template <int V> constexpr int RB = row_packs(V, 8, 2);
constexpr int RBS = 2;

template <typename T, int V>
__device__ void rms_fwd_row(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int n, float eps,
                            RowReducer<2>& red) {
    constexpr int R = RF;
    const int nv = n / V;
    const bool cached = nv <= R * (int)blockDim.x;
    Pack<T, V> xr[R];
    float ss = 0.f;
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) xr[r] = load_raw<T, V>(x + (size_t)i * V);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
                float t[V];
                unpack<T, V>(xr[r], t);
#pragma unroll
                for (int k = 0; k < V; k++) ss += t[k] * t[k];
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V];
            load<T, V>(x + (size_t)i * V, t);
#pragma unroll
            for (int k = 0; k < V; k++) ss += t[k] * t[k];
        }
    }
    ss = red.reduce1(ss, SumOp(), 0.f);
    const float rstd = rsqrtf(ss / (float)n + eps);
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
                float t[V], wv[V];
                unpack<T, V>(xr[r], t);
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) t[k] = t[k] * rstd * wv[k];
                store<T, V>(y + (size_t)i * V, t);
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V], wv[V];
            load<T, V>(x + (size_t)i * V, t);
            load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
            for (int k = 0; k < V; k++) t[k] = t[k] * rstd * wv[k];
            store<T, V>(y + (size_t)i * V, t);
        }
    }
}

// Inference's residual step fused with the next norm: s = x + r, rounded to T as a separate add
// would store it, then y = rms_norm(s) ⊙ w. The row stays in registers (the host launches this
// only when it fits: nv ≤ RF · blockDim), so s is written once and never read back.
template <typename T, int V>
__device__ void add_rms_fwd_row(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ w,
                                T* __restrict__ s, T* __restrict__ y, int n, float eps, RowReducer<2>& red) {
    constexpr int R = RF;
    const int nv = n / V;
    Pack<T, V> sr[R];
    float ss = 0.f;
#pragma unroll
    for (int q = 0; q < R; q++) {
        const int i = threadIdx.x + q * blockDim.x;
        if (i < nv) {
            float a[V], b[V];
            load<T, V>(x + (size_t)i * V, a);
            load<T, V>(r + (size_t)i * V, b);
#pragma unroll
            for (int k = 0; k < V; k++) {
                sr[q].v[k] = from_f<T>(a[k] + b[k]);
                const float t = to_f(sr[q].v[k]);
                ss += t * t;
            }
            *reinterpret_cast<Pack<T, V>*>(s + (size_t)i * V) = sr[q];
        }
    }
    ss = red.reduce1(ss, SumOp(), 0.f);
    const float rstd = rsqrtf(ss / (float)n + eps);
#pragma unroll
    for (int q = 0; q < R; q++) {
        const int i = threadIdx.x + q * blockDim.x;
        if (i < nv) {
            float t[V], wv[V];
            unpack<T, V>(sr[q], t);
            load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
            for (int k = 0; k < V; k++) t[k] = t[k] * rstd * wv[k];
            store<T, V>(y + (size_t)i * V, t);
        }
    }
}

// LayerNorm's statistics come from sums about a centre c: with dm = Σ(x − c)/n,
// mean = c + dm and var = Σ(x − c)²/n − dm². For f32 rows c is the mean (a first reduction), so
// dm is only its rounding and the variance is exact in the algebra. For 16-bit rows held in
// registers c is a pivot, x[0], and one block reduction gives both: the subtraction then loses
// f32 digits in proportion to (mean − c)²/var, at most n (when x[0] is an outlier), so the
// variance keeps a relative precision of n·2⁻²⁴ or better, under 1e-3 for those rows
// (n ≤ 16384) and below a 16-bit output's rounding. A block reduction's barriers are time in which
// the block has no loads in flight, and a bf16 row is only 8 KB: with the mean first, LayerNorm
// bf16 ran at 89.6 µs where RMSNorm (one reduction) took 78.8 (8×2048×4096, H200); about x[0],
// 78.7. f32 rows hide the reductions behind their 16 KB (95% of the copy bandwidth either way).
template <typename T> constexpr bool kPivotStats = sizeof(T) == 2;

// Calls f(i, t) for each pack i of this thread's share of a row, with t its values: from the
// registers `xr` when the row is held there (unrolled, so that they stay registers), else
// loaded from `x`.
template <typename T, int V, int R, typename F>
__device__ __forceinline__ void for_each_pack(bool cached, int nv, const Pack<T, V> (&xr)[R], const T* __restrict__ x, F f) {
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) {
                float t[V];
                unpack<T, V>(xr[r], t);
                f(i, t);
            }
        }
    } else {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float t[V];
            load<T, V>(x + (size_t)i * V, t);
            f(i, t);
        }
    }
}

template <typename T, int V>
__device__ void layer_fwd_row(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
                              float2* __restrict__ stats, int n, float eps, RowReducer<2>& red) {
    constexpr int R = RF;
    const int nv = n / V;
    const bool cached = nv <= R * (int)blockDim.x;
    Pack<T, V> xr[R];
    if (cached) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv) xr[r] = load_raw<T, V>(x + (size_t)i * V);
        }
    }
    // The centre: x[0], or the mean from a first reduction.
    float c;
    if (cached && kPivotStats<T>) {
        c = to_f(x[0]);
    } else {
        float s = 0.f;
        for_each_pack<T, V, R>(cached, nv, xr, x, [&](int, const float (&t)[V]) {
#pragma unroll
            for (int k = 0; k < V; k++) s += t[k];
        });
        c = red.reduce1(s, SumOp(), 0.f) / (float)n;
    }
    float s[2] = {0.f, 0.f};  // Σ(x − c), Σ(x − c)²
    for_each_pack<T, V, R>(cached, nv, xr, x, [&](int, const float (&t)[V]) {
#pragma unroll
        for (int k = 0; k < V; k++) { const float d = t[k] - c; s[0] += d; s[1] += d * d; }
    });
    red.reduce<2>(s, SumOp(), 0.f);
    const float dm = s[0] / (float)n;
    const float mean = c + dm;
    const float rstd = rsqrtf(fmaxf(s[1] / (float)n - dm * dm, 0.f) + eps);
    if (stats != nullptr && threadIdx.x == 0) *stats = make_float2(mean, rstd);
    for_each_pack<T, V, R>(cached, nv, xr, x, [&](int i, const float (&t)[V]) {
        float o[V], wv[V], bv[V];
        load<T, V>(w + (size_t)i * V, wv);
        load<T, V>(b + (size_t)i * V, bv);
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = (t[k] - mean) * rstd * wv[k] + bv[k];
        store<T, V>(y + (size_t)i * V, o);
    });
}

// RMSNorm backward. With r = rsqrt(mean(x²) + eps), x̂ = x·r, g = dy ⊙ w:
//   dx = r · (g − x̂ · mean(g ⊙ x̂)),   dw = Σ_rows dy ⊙ x̂.
// Both row sums (Σx², Σg·x) come from one block reduction.
template <typename T, int V>
__device__ void rms_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
                        float* __restrict__ part_dw, int rows, int n, float eps) {
    __shared__ float shm[2 * 32];
    const int nv = n / V;
    const bool cached = nv <= RB<V> * (int)blockDim.x;
    float acc[RB<V>][V];
#pragma unroll
    for (int r = 0; r < RB<V>; r++)
#pragma unroll
        for (int k = 0; k < V; k++) acc[r][k] = 0.f;
    float* prow = part_dw + (size_t)blockIdx.x * n;
    bool first = true;
    for (int row = blockIdx.x; row < rows; row += gridDim.x, first = false) {
        const T* xr = x + (size_t)row * n;
        const T* gr = dy + (size_t)row * n;
        T* dr = dx + (size_t)row * n;
        float xv[RB<V>][V], gv[RB<V>][V];
        float s[2] = {0.f, 0.f};  // Σx², Σ(dy·w)·x
        if (cached) {
            // Every load of the row issued before the first use.
#pragma unroll
            for (int r = 0; r < RB<V>; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                if (i < nv) {
                    load<T, V>(xr + (size_t)i * V, xv[r]);
                    load<T, V>(gr + (size_t)i * V, gv[r]);
                }
            }
#pragma unroll
            for (int r = 0; r < RB<V>; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                if (i < nv) {
                    float wv[V];
                    load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                    for (int k = 0; k < V; k++) { s[0] += xv[r][k] * xv[r][k]; s[1] += gv[r][k] * wv[k] * xv[r][k]; }
                }
            }
        } else {
            for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                float a[V], g[V], wv[V];
                load<T, V>(xr + (size_t)i * V, a);
                load<T, V>(gr + (size_t)i * V, g);
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) { s[0] += a[k] * a[k]; s[1] += g[k] * wv[k] * a[k]; }
            }
        }
        block_reduce<2>(s, SumOp(), 0.f, shm);
        const float rstd = rsqrtf(s[0] / (float)n + eps);
        const float c = s[1] * rstd * rstd / (float)n;  // mean(g·x̂) · r⁻¹ folded: x̂·mean(g·x̂) = x·r²·Σ(g·x)/n
        if (cached) {
#pragma unroll
            for (int r = 0; r < RB<V>; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                if (i < nv) {
                    float wv[V], o[V];
                    load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                    for (int k = 0; k < V; k++) {
                        o[k] = rstd * (gv[r][k] * wv[k] - xv[r][k] * c);
                        acc[r][k] += gv[r][k] * xv[r][k] * rstd;
                    }
                    store<T, V>(dr + (size_t)i * V, o);
                }
            }
        } else {
            for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                float a[V], g[V], wv[V], o[V];
                load<T, V>(xr + (size_t)i * V, a);
                load<T, V>(gr + (size_t)i * V, g);
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    o[k] = rstd * (g[k] * wv[k] - a[k] * c);
                    const float d = g[k] * a[k] * rstd;
                    prow[(size_t)i * V + k] = first ? d : prow[(size_t)i * V + k] + d;
                }
                store<T, V>(dr + (size_t)i * V, o);
            }
        }
    }
    if (cached) {
#pragma unroll
        for (int r = 0; r < RB<V>; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) prow[(size_t)i * V + k] = acc[r][k];
        }
    }
}

// LayerNorm backward. With x̂ = (x − mean)·r, g = dy ⊙ w:
//   dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂)),   dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy.
template <typename T, int V>
__device__ void layer_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
                          float* __restrict__ part_dw, float* __restrict__ part_db, int rows, int n, float eps) {
    __shared__ float shm[4 * 32];  // [0, 32): the mean; [32, 128): the three row sums
    const int nv = n / V;
    const bool cached = nv <= RB<V> * (int)blockDim.x;
    float accw[RB<V>][V], accb[RB<V>][V];
#pragma unroll
    for (int r = 0; r < RB<V>; r++)
#pragma unroll
        for (int k = 0; k < V; k++) { accw[r][k] = 0.f; accb[r][k] = 0.f; }
    float* pw = part_dw + (size_t)blockIdx.x * n;
    float* pb = part_db + (size_t)blockIdx.x * n;
    bool first = true;
    for (int row = blockIdx.x; row < rows; row += gridDim.x, first = false) {
        const T* xr = x + (size_t)row * n;
        const T* gr = dy + (size_t)row * n;
        T* dr = dx + (size_t)row * n;
        float xv[RB<V>][V], gv[RB<V>][V];
        if (cached) {
#pragma unroll
            for (int r = 0; r < RB<V>; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                if (i < nv) {
                    load<T, V>(xr + (size_t)i * V, xv[r]);
                    load<T, V>(gr + (size_t)i * V, gv[r]);
                }
            }
        }
        float mean, rstd, mg, mgx;
        if (cached && kPivotStats<T>) {
            // One reduction about the pivot p = x[0] (see kPivotStats): Σ(x − p), Σ(x − p)², Σg,
            // Σg·(x − p); then Σg·(x − mean) = Σg·(x − p) − (mean − p)·Σg. The other rows keep
            // a mean and then three centred sums: written as sums about one centre, as the
            // forward pass is, f32 rows took 238 µs instead of 225 (8×2048×4096, H200).
            const float p = to_f(xr[0]);
            float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int r = 0; r < RB<V>; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                if (i < nv) {
                    float wv[V];
                    load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                    for (int k = 0; k < V; k++) {
                        const float d = xv[r][k] - p, g = gv[r][k] * wv[k];
                        s[0] += d; s[1] += d * d; s[2] += g; s[3] += g * d;
                    }
                }
            }
            block_reduce<4>(s, SumOp(), 0.f, shm);
            const float dm = s[0] / (float)n;
            mean = p + dm;
            rstd = rsqrtf(fmaxf(s[1] / (float)n - dm * dm, 0.f) + eps);
            mg = s[2] / (float)n;
            mgx = (s[3] - dm * s[2]) * rstd / (float)n;
        } else {
            float s1 = 0.f;
            if (cached) {
#pragma unroll
                for (int r = 0; r < RB<V>; r++) {
                    const int i = threadIdx.x + r * blockDim.x;
                    if (i < nv)
#pragma unroll
                        for (int k = 0; k < V; k++) s1 += xv[r][k];
                }
            } else {
                for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                    float a[V];
                    load<T, V>(xr + (size_t)i * V, a);
#pragma unroll
                    for (int k = 0; k < V; k++) s1 += a[k];
                }
            }
            mean = block_reduce1(s1, SumOp(), 0.f, shm) / (float)n;
            float s[3] = {0.f, 0.f, 0.f};  // Σ(x−mean)², Σg, Σg·(x−mean)
            if (cached) {
#pragma unroll
                for (int r = 0; r < RB<V>; r++) {
                    const int i = threadIdx.x + r * blockDim.x;
                    if (i < nv) {
                        float wv[V];
                        load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                        for (int k = 0; k < V; k++) {
                            const float d = xv[r][k] - mean, g = gv[r][k] * wv[k];
                            s[0] += d * d; s[1] += g; s[2] += g * d;
                        }
                    }
                }
            } else {
                for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                    float a[V], b[V], wv[V];
                    load<T, V>(xr + (size_t)i * V, a);
                    load<T, V>(gr + (size_t)i * V, b);
                    load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                    for (int k = 0; k < V; k++) {
                        const float d = a[k] - mean, g = b[k] * wv[k];
                        s[0] += d * d; s[1] += g; s[2] += g * d;
                    }
                }
            }
            block_reduce<3>(s, SumOp(), 0.f, shm + 32);
            rstd = rsqrtf(s[0] / (float)n + eps);
            mg = s[1] / (float)n;
            mgx = s[2] * rstd / (float)n;  // mean(g·x̂)
        }
        if (cached) {
#pragma unroll
            for (int r = 0; r < RB<V>; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                if (i < nv) {
                    float wv[V], o[V];
                    load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                    for (int k = 0; k < V; k++) {
                        const float xh = (xv[r][k] - mean) * rstd;
                        o[k] = rstd * (gv[r][k] * wv[k] - mg - xh * mgx);
                        accw[r][k] += gv[r][k] * xh;
                        accb[r][k] += gv[r][k];
                    }
                    store<T, V>(dr + (size_t)i * V, o);
                }
            }
        } else {
            for (int i = threadIdx.x; i < nv; i += blockDim.x) {
                float a[V], b[V], wv[V], o[V];
                load<T, V>(xr + (size_t)i * V, a);
                load<T, V>(gr + (size_t)i * V, b);
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float xh = (a[k] - mean) * rstd;
                    o[k] = rstd * (b[k] * wv[k] - mg - xh * mgx);
                    const size_t c = (size_t)i * V + k;
                    pw[c] = first ? b[k] * xh : pw[c] + b[k] * xh;
                    pb[c] = first ? b[k] : pb[c] + b[k];
                }
                store<T, V>(dr + (size_t)i * V, o);
            }
        }
    }
    if (cached) {
#pragma unroll
        for (int r = 0; r < RB<V>; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            if (i < nv)
#pragma unroll
                for (int k = 0; k < V; k++) {
                    pw[(size_t)i * V + k] = accw[r][k];
                    pb[(size_t)i * V + k] = accb[r][k];
                }
        }
    }
}

// Backward for 16-bit rows of at most RBS packs per thread, RMSNorm (LN = false) or LayerNorm:
// the same persistent blocks and algebra as rms_bwd and layer_bwd (LayerNorm about the pivot
// x[0]), but the rows' x and dy are copied into shared memory (copy_async16) STAGES − 1 rows
// ahead of the one being reduced and written, in a ring of STAGES slots of nv packs each
// (2·STAGES·n·sizeof(T) bytes from the host), and the reductions take one barrier each. With
// the rows in registers only, a block has no loads in flight from the end of a row's loads to
// the start of the next row's: RMSNorm bf16 at 8×2048×4096 (H200) took 145 µs, staged 121.
// Each thread copies and reads its own packs only, so the copies need no barrier. A thread reads
// its packs from the slot at each use rather than holding them across the reduction, which
// keeps LayerNorm at 64 registers instead of 95 (measured: 166 µs against 188 held). The host
// launches STAGES = 2: rings of 3 and 4 slots were not faster (LayerNorm 171.6 and 172.8 µs
// against 166.8 at 3 blocks per SM), so LayerNorm's remaining gap to RMSNorm is not the memory
// latency a deeper ring would hide.
// SAVED (LayerNorm only): the row statistics come from the forward pass (`stats`, mean and 1/std
// per row, loaded with the row's copies), so a row reduces two sums (Σg, Σg·(x − mean)) instead
// of four, and the weight's packs are loaded once and kept in registers rather than read from L1
// at each use; measured in bench/kernel-lab/rowlab.cu (bf16 8×2048×4096, H200): 125.7 µs at 2
// blocks per SM, against 166.7 for the pivot statistics at their best (3 per SM).
template <typename T, int V, bool LN, int STAGES = 2, bool SAVED = false>
__device__ void norm_bwd_staged(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
                                float* __restrict__ part_dw, float* __restrict__ part_db,
                                const float2* __restrict__ stats, int rows, int n, float eps) {
    static_assert(STAGES >= 2, "the ring needs a slot being read and one being filled");
    static_assert(LN || !SAVED, "only LayerNorm's forward saves its statistics");
    extern __shared__ __align__(16) unsigned char stage_mem[];
    __shared__ float shm[2 * 4 * 32];
    RowReducer<4> red(shm);
    constexpr int R = RBS;
    const int nv = n / V;
    Pack<T, V>* sx = reinterpret_cast<Pack<T, V>*>(stage_mem);  // [STAGES][nv]
    Pack<T, V>* sg = sx + STAGES * nv;                           // [STAGES][nv]
    // LayerNorm's row values for the current row and the rows staged ahead, loaded with them:
    // the pivot x[0] (.x), or the saved mean and 1/std. (Read from shared memory, a pivot would
    // need a barrier; from global memory when needed, a full memory latency per row.)
    float2 rowv[STAGES];
    // Starts the copies of row `r` into `slot` and commits them as one group (an empty group
    // past the last row, so that the waits below keep their meaning).
    auto stage_row = [&](int r, int slot, float2& p) {
        if (r < rows) {
#pragma unroll
            for (int q = 0; q < R; q++) {
                const int i = threadIdx.x + q * blockDim.x;
                if (i < nv) {
                    copy_async16(&sx[slot * nv + i], x + (size_t)r * n + (size_t)i * V);
                    copy_async16(&sg[slot * nv + i], dy + (size_t)r * n + (size_t)i * V);
                }
            }
            if (SAVED) p = stats[r];
            else if (LN) p = make_float2(to_f(x[(size_t)r * n]), 0.f);
        }
        copy_commit();
    };
    // The weight's packs: in registers for SAVED (loaded once), else from L1 at each use.
    Pack<T, V> wr[SAVED ? R : 1];
    if (SAVED) {
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int i = threadIdx.x + q * blockDim.x;
            if (i < nv) wr[q] = load_raw<T, V>(w + (size_t)i * V);
        }
    }
    auto weight_pack = [&](int q, int i, float (&wv)[V]) {
        if (SAVED) unpack<T, V>(wr[SAVED ? q : 0], wv);
        else load<T, V>(w + (size_t)i * V, wv);
    };
    float accw[R][V], accb[R][V];
#pragma unroll
    for (int q = 0; q < R; q++)
#pragma unroll
        for (int k = 0; k < V; k++) { accw[q][k] = 0.f; accb[q][k] = 0.f; }
    int row = blockIdx.x;  // the host launches at most `rows` blocks
#pragma unroll
    for (int j = 0; j < STAGES - 1; j++) stage_row(row + j * gridDim.x, j, rowv[j]);
    for (int slot = 0; row < rows; row += gridDim.x, slot = slot + 1 == STAGES ? 0 : slot + 1) {
        const int ahead_slot = slot == 0 ? STAGES - 1 : slot - 1;
        stage_row(row + (STAGES - 1) * gridDim.x, ahead_slot, rowv[STAGES - 1]);
        copy_wait<STAGES - 1>();  // this row's group is complete
        // This thread's packs of the row, x and dy, in f32, read from the slot.
        auto row_pack = [&](int i, float (&xo)[V], float (&go)[V]) {
            unpack<T, V>(load_raw<T, V>(reinterpret_cast<const T*>(&sx[slot * nv + i])), xo);
            unpack<T, V>(load_raw<T, V>(reinterpret_cast<const T*>(&sg[slot * nv + i])), go);
        };
        // RMSNorm: Σx², Σg·x. LayerNorm: Σ(x − p), Σ(x − p)², Σg, Σg·(x − p) (see layer_bwd);
        // with saved statistics Σg, Σg·(x − mean).
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int i = threadIdx.x + q * blockDim.x;
            if (i < nv) {
                float wv[V], xq[V], gq[V];
                weight_pack(q, i, wv);
                row_pack(i, xq, gq);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float g = gq[k] * wv[k];
                    if (SAVED) {
                        s[0] += g; s[1] += g * (xq[k] - rowv[0].x);
                    } else if (LN) {
                        const float d = xq[k] - rowv[0].x;
                        s[0] += d; s[1] += d * d; s[2] += g; s[3] += g * d;
                    } else {
                        s[0] += xq[k] * xq[k]; s[1] += g * xq[k];
                    }
                }
            }
        }
        float mean = 0.f, rstd, mg = 0.f, c;
        if (SAVED) {
            float s2[2] = {s[0], s[1]};
            red.reduce<2>(s2, SumOp(), 0.f);
            mean = rowv[0].x;
            rstd = rowv[0].y;
            mg = s2[0] / (float)n;
            c = s2[1] * rstd / (float)n;  // mean(g·x̂)
        } else if (LN) {
            red.reduce<4>(s, SumOp(), 0.f);
            const float dm = s[0] / (float)n;
            mean = rowv[0].x + dm;
            rstd = rsqrtf(fmaxf(s[1] / (float)n - dm * dm, 0.f) + eps);
            mg = s[2] / (float)n;
            c = (s[3] - dm * s[2]) * rstd / (float)n;  // mean(g·x̂)
        } else {
            float s2[2] = {s[0], s[1]};
            red.reduce<2>(s2, SumOp(), 0.f);
            rstd = rsqrtf(s2[0] / (float)n + eps);
            c = s2[1] * rstd * rstd / (float)n;  // as in rms_bwd
        }
        T* dr = dx + (size_t)row * n;
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int i = threadIdx.x + q * blockDim.x;
            if (i < nv) {
                float wv[V], o[V], xq[V], gq[V];
                weight_pack(q, i, wv);
                row_pack(i, xq, gq);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    if (LN) {
                        const float xh = (xq[k] - mean) * rstd;
                        o[k] = rstd * (gq[k] * wv[k] - mg - xh * c);
                        accw[q][k] += gq[k] * xh;
                        accb[q][k] += gq[k];
                    } else {
                        o[k] = rstd * (gq[k] * wv[k] - xq[k] * c);
                        accw[q][k] += gq[k] * xq[k] * rstd;
                    }
                }
                store<T, V>(dr + (size_t)i * V, o);
            }
        }
#pragma unroll
        for (int j = 0; j + 1 < STAGES; j++) rowv[j] = rowv[j + 1];
    }
    float* pw = part_dw + (size_t)blockIdx.x * n;
#pragma unroll
    for (int q = 0; q < R; q++) {
        const int i = threadIdx.x + q * blockDim.x;
        if (i < nv)
#pragma unroll
            for (int k = 0; k < V; k++) {
                pw[(size_t)i * V + k] = accw[q][k];
                if (LN) part_db[(size_t)blockIdx.x * n + (size_t)i * V + k] = accb[q][k];
            }
    }
}

#define NORM_KERNELS_V(NAME, T, V, SUF)                                                                       \
    extern "C" __global__ void rms_fwd_##NAME##_##SUF(const T* x, const T* w, T* y, int rows, int n, float eps) { \
        __shared__ float shm[2 * 2 * 32];                                                                     \
        RowReducer<2> red(shm);                                                                               \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                              \
            rms_fwd_row<T, V>(x + (size_t)row * n, w, y + (size_t)row * n, n, eps, red);                      \
    }                                                                                                         \
    extern "C" __global__ void add_rms_fwd_##NAME##_##SUF(const T* x, const T* r, const T* w, T* s, T* y, int rows, \
                                                          int n, float eps) {                                 \
        __shared__ float shm[2 * 2 * 32];                                                                     \
        RowReducer<2> red(shm);                                                                               \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                              \
            add_rms_fwd_row<T, V>(x + (size_t)row * n, r + (size_t)row * n, w, s + (size_t)row * n,           \
                                  y + (size_t)row * n, n, eps, red);                                          \
    }                                                                                                         \
    extern "C" __global__ void layer_fwd_##NAME##_##SUF(const T* x, const T* w, const T* b, T* y, float2* stats, \
                                                        int rows, int n, float eps) {                         \
        __shared__ float shm[2 * 2 * 32];                                                                     \
        RowReducer<2> red(shm);                                                                               \
        for (int row = blockIdx.x; row < rows; row += gridDim.x)                                              \
            layer_fwd_row<T, V>(x + (size_t)row * n, w, b, y + (size_t)row * n, stats ? stats + row : nullptr, \
                                n, eps, red);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void rms_bwd_##NAME##_##SUF(const T* x, const T* w, const T* dy, T* dx, float* part_dw, \
                                                      int rows, int n, float eps) {                           \
        rms_bwd<T, V>(x, w, dy, dx, part_dw, rows, n, eps);                                                   \
    }                                                                                                         \
    extern "C" __global__ void layer_bwd_##NAME##_##SUF(const T* x, const T* w, const T* dy, T* dx, float* part_dw, \
                                                        float* part_db, int rows, int n, float eps) {         \
        layer_bwd<T, V>(x, w, dy, dx, part_dw, part_db, rows, n, eps);                                        \
    }
#define NORM_KERNELS(NAME, T, V)                                                                   \
    NORM_KERNELS_V(NAME, T, V, v)                                                                  \
    NORM_KERNELS_V(NAME, T, 1, s)                                                                  \
    extern "C" __global__ void reduce_cols_##NAME(const float* part, int groups, int n, T* out) { \
        reduce_partials<T>(part, groups, n, out);                                                  \
    }
MC_FOR_TYPES(NORM_KERNELS)

// The staged backward, for the 16-bit types only (their pivot statistics; f32 rows are 16 KB
// and reach 84–100% of their bandwidth floor without it).
#define NORM_STAGED_KERNELS(NAME, T, V)                                                                        \
    extern "C" __global__ void rms_bwd_staged_##NAME(const T* x, const T* w, const T* dy, T* dx, float* part_dw, \
                                                     int rows, int n, float eps) {                            \
        norm_bwd_staged<T, V, false>(x, w, dy, dx, part_dw, nullptr, nullptr, rows, n, eps);                   \
    }                                                                                                          \
    extern "C" __global__ void layer_bwd_staged_##NAME(const T* x, const T* w, const T* dy, T* dx, float* part_dw, \
                                                       float* part_db, int rows, int n, float eps) {           \
        norm_bwd_staged<T, V, true>(x, w, dy, dx, part_dw, part_db, nullptr, rows, n, eps);                    \
    }                                                                                                          \
    extern "C" __global__ void layer_bwd_saved_##NAME(const T* x, const T* w, const T* dy, T* dx, float* part_dw, \
                                                      float* part_db, const float2* stats, int rows, int n) {  \
        norm_bwd_staged<T, V, true, 2, true>(x, w, dy, dx, part_dw, part_db, stats, rows, n, 0.f);             \
    }
NORM_STAGED_KERNELS(bf16, __nv_bfloat16, 8)
NORM_STAGED_KERNELS(f16, __half, 8)
