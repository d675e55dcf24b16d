// Attention of one new query per head against cached keys and values (decoding):
// y[b, h] = softmax(q[b, h] · K[b, h / rep]ᵀ) · V[b, h / rep], q already scaled by 1/√d.
// One block per (batch, head); the query, the scores and the partial outputs live in shared
// memory (the host launches this only when they fit); f32 arithmetic. K and V are read through
// their batch and head strides, so a view of a larger cache buffer needs no copy.
#include "common.cuh"

template <typename T>
__device__ void decode_attn(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            T* __restrict__ y, int heads, int rep, int t_len, int d, long long kb, long long kh,
                            long long vb, long long vh) {
    extern __shared__ float sm[];
    float* qs = sm;               // d
    float* sc = qs + d;           // t_len
    float* part = sc + t_len;     // blockDim.x
    float* red = part + blockDim.x;  // 32
    const int bh = blockIdx.x, b = bh / heads, g = (bh % heads) / rep;
    const T* qp = q + (size_t)bh * d;
    const T* kp = k + b * kb + g * kh;
    const T* vp = v + b * vb + g * vh;
    for (int j = threadIdx.x; j < d; j += blockDim.x) qs[j] = to_f(qp[j]);
    __syncthreads();
    float mx = -INFINITY;
    for (int t = threadIdx.x; t < t_len; t += blockDim.x) {
        const T* kr = kp + (size_t)t * d;
        float s = 0.f;
        for (int j = 0; j < d; j++) s += qs[j] * to_f(kr[j]);
        sc[t] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_reduce1(mx, MaxOp(), -INFINITY, red);
    float sum = 0.f;
    for (int t = threadIdx.x; t < t_len; t += blockDim.x) {
        const float e = __expf(sc[t] - mx);
        sc[t] = e;
        sum += e;
    }
    sum = block_reduce1(sum, SumOp(), 0.f, red);  // its barriers also publish sc
    // Thread (grp, j) sums column j over the keys t ≡ grp (mod groups); coalesced over j.
    const int groups = blockDim.x / d, grp = threadIdx.x / d, j = threadIdx.x % d;
    float acc = 0.f;
    if (grp < groups)
        for (int t = grp; t < t_len; t += groups) acc += sc[t] * to_f(vp[(size_t)t * d + j]);
    part[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < d) {
        float o = 0.f;
        for (int gi = 0; gi < groups; gi++) o += part[gi * d + threadIdx.x];
        y[(size_t)bh * d + threadIdx.x] = from_f<T>(o / sum);
    }
}

#define DECODE_ATTN(NAME, T, V)                                                                              \
    extern "C" __global__ void decode_attn_##NAME(const T* q, const T* k, const T* v, T* y, int heads, int rep, \
                                                  int t_len, int d, long long kb, long long kh, long long vb,   \
                                                  long long vh) {                                               \
        decode_attn<T>(q, k, v, y, heads, rep, t_len, d, kb, kh, vb, vh);                                       \
    }
MC_FOR_TYPES(DECODE_ATTN)

// ---------------------------------------------------------------------------------------------
// Causal attention (training and prefill): the host computes the scores S = q·kᵀ in f32 with
// batched cuBLAS GEMMs, these kernels turn each row of S into probabilities (forward) or into
// the score gradient (backward), and further GEMMs finish the job. Row `row` of S belongs to
// query i = row % s of batch row / per_batch; it sees keys lo ..= i + t − s, with lo from
// `first_key` (batch, s) or 0. Keys outside that range get probability 0 and are never read.
// One block per row; the row is held in registers (C elements per thread) when it fits, else
// re-read (any length). A row with no visible key is all zeros.

constexpr int C = 8;

__device__ __forceinline__ void visible_keys(int row, int s, int t, int per_batch, const unsigned* __restrict__ first_key,
                                             int& lo, int& hi) {
    const int i = row % s;
    hi = i + (t - s);
    lo = first_key ? (int)first_key[(size_t)(row / per_batch) * s + i] : 0;
}

// P = softmax(scale · S) over the visible keys, 0 elsewhere.
template <typename T>
__device__ void causal_softmax_fwd(const float* __restrict__ S, T* __restrict__ P, const unsigned* __restrict__ first_key,
                                   int s, int t, int per_batch, float scale) {
    __shared__ float red[32];
    const int row = blockIdx.x;
    int lo, hi;
    visible_keys(row, s, t, per_batch, first_key, lo, hi);
    const float* x = S + (size_t)row * t;
    T* y = P + (size_t)row * t;
    const bool cached = t <= C * (int)blockDim.x;
    float v[C];
    float mx = -INFINITY;
    if (cached) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            const int j = threadIdx.x + c * blockDim.x;
            v[c] = (j >= lo && j <= hi) ? x[j] * scale : -INFINITY;
            mx = fmaxf(mx, v[c]);
        }
    } else {
        for (int j = max(lo, 0) + threadIdx.x; j <= hi; j += blockDim.x) mx = fmaxf(mx, x[j] * scale);
    }
    mx = block_reduce1(mx, MaxOp(), -INFINITY, red);
    float sum = 0.f;
    if (cached) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            v[c] = v[c] == -INFINITY ? 0.f : __expf(v[c] - mx);
            sum += v[c];
        }
    } else {
        for (int j = max(lo, 0) + threadIdx.x; j <= hi; j += blockDim.x) sum += __expf(x[j] * scale - mx);
    }
    sum = block_reduce1(sum, SumOp(), 0.f, red);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    if (cached) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            const int j = threadIdx.x + c * blockDim.x;
            if (j < t) y[j] = from_f<T>(v[c] * inv);
        }
    } else {
        for (int j = threadIdx.x; j < t; j += blockDim.x)
            y[j] = from_f<T>((j >= lo && j <= hi) ? __expf(x[j] * scale - mx) * inv : 0.f);
    }
}

// From S and dP = dy·vᵀ (both f32): P = softmax(scale · S) as in the forward pass, and
// dS = scale · P ⊙ (dP − Σ P ⊙ dP), both written in T for the gradient GEMMs.
template <typename T>
__device__ void causal_softmax_bwd(const float* __restrict__ S, const float* __restrict__ dP, T* __restrict__ P,
                                   T* __restrict__ dS, const unsigned* __restrict__ first_key, int s, int t, int per_batch,
                                   float scale) {
    __shared__ float red[64];
    const int row = blockIdx.x;
    int lo, hi;
    visible_keys(row, s, t, per_batch, first_key, lo, hi);
    const float* x = S + (size_t)row * t;
    const float* g = dP + (size_t)row * t;
    const size_t off = (size_t)row * t;
    const bool cached = t <= C * (int)blockDim.x;
    float v[C], gv[C];
    float mx = -INFINITY;
    if (cached) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            const int j = threadIdx.x + c * blockDim.x;
            const bool in = j >= lo && j <= hi;
            v[c] = in ? x[j] * scale : -INFINITY;
            gv[c] = in ? g[j] : 0.f;
            mx = fmaxf(mx, v[c]);
        }
    } else {
        for (int j = max(lo, 0) + threadIdx.x; j <= hi; j += blockDim.x) mx = fmaxf(mx, x[j] * scale);
    }
    mx = block_reduce1(mx, MaxOp(), -INFINITY, red);
    float sums[2] = {0.f, 0.f};  // Σ e, Σ e·dP
    if (cached) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            v[c] = v[c] == -INFINITY ? 0.f : __expf(v[c] - mx);
            sums[0] += v[c];
            sums[1] += v[c] * gv[c];
        }
    } else {
        for (int j = max(lo, 0) + threadIdx.x; j <= hi; j += blockDim.x) {
            const float e = __expf(x[j] * scale - mx);
            sums[0] += e;
            sums[1] += e * g[j];
        }
    }
    block_reduce<2>(sums, SumOp(), 0.f, red);
    const float inv = sums[0] > 0.f ? 1.f / sums[0] : 0.f;
    const float delta = sums[1] * inv;
    if (cached) {
#pragma unroll
        for (int c = 0; c < C; c++) {
            const int j = threadIdx.x + c * blockDim.x;
            if (j < t) {
                const float p = v[c] * inv;
                P[off + j] = from_f<T>(p);
                dS[off + j] = from_f<T>(scale * p * (gv[c] - delta));
            }
        }
    } else {
        for (int j = threadIdx.x; j < t; j += blockDim.x) {
            const bool in = j >= lo && j <= hi;
            const float p = in ? __expf(x[j] * scale - mx) * inv : 0.f;
            P[off + j] = from_f<T>(p);
            dS[off + j] = from_f<T>(in ? scale * p * (g[j] - delta) : 0.f);
        }
    }
}

#define CAUSAL_SOFTMAX(NAME, T, V)                                                                                  \
    extern "C" __global__ void causal_softmax_fwd_##NAME(const float* S, T* P, const unsigned* first_key, int s,     \
                                                         int t, int per_batch, float scale) {                        \
        causal_softmax_fwd<T>(S, P, first_key, s, t, per_batch, scale);                                             \
    }                                                                                                                \
    extern "C" __global__ void causal_softmax_bwd_##NAME(const float* S, const float* dP, T* P, T* dS,                \
                                                         const unsigned* first_key, int s, int t, int per_batch,      \
                                                         float scale) {                                              \
        causal_softmax_bwd<T>(S, dP, P, dS, first_key, s, t, per_batch, scale);                                     \
    }
MC_FOR_TYPES(CAUSAL_SOFTMAX)
