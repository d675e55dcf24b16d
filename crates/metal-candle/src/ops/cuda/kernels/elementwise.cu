// Element-wise fused ops: SwiGLU (forward, and a backward writing both gradients) and the
// rotary embedding (forward; the backward is the same kernel with sign = -1). Memory-bound, so
// each is one grid-stride loop over packs of V elements (16-byte loads and stores where the host
// found every pointer and length aligned, V = 1 otherwise), with f32 arithmetic.
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                                     \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// 1 / (1 + e^-g); __expf overflowing to inf for very negative g gives the right limit, 0.
__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// y = silu(g) * u over nv packs.
template <typename T, int V>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, size_t nv) {
    GRID_STRIDE(i, nv) {
        float a[V], b[V];
        load<T, V>(g + i * V, a);
        load<T, V>(u + i * V, b);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] = a[k] * sigmoid(a[k]) * b[k];
        store<T, V>(y + i * V, a);
    }
}

// dg = dy * u * s * (1 + g * (1 - s)) and du = dy * g * s with s = sigmoid(g), in one pass.
template <typename T, int V>
__device__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dy,
                           T* __restrict__ dg, T* __restrict__ du, size_t nv) {
    GRID_STRIDE(i, nv) {
        float a[V], b[V], d[V], da[V], db[V];
        load<T, V>(g + i * V, a);
        load<T, V>(u + i * V, b);
        load<T, V>(dy + i * V, d);
#pragma unroll
        for (int k = 0; k < V; k++) {
            const float s = sigmoid(a[k]);
            db[k] = d[k] * a[k] * s;
            da[k] = d[k] * b[k] * s * (1.f + a[k] * (1.f - s));
        }
        store<T, V>(dg + i * V, da);
        store<T, V>(du + i * V, db);
    }
}

// The rotary embedding. x and y are (rows, 2 * half_dim), rows ordered (batch, heads, seq); the
// tables cos_t and sin_t are (batch, seq, half_dim) when `batched`, else (1, seq, half_dim).
// Each step rotates V pairs (j, j + half_dim) of one row: y[j] = x[j] c - x[j + half_dim] s' and
// y[j + half_dim] = x[j + half_dim] c + x[j] s', with s' = sign * s (sign = -1: the backward).
template <typename T, int V>
__device__ void rope(const T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                     T* __restrict__ y, size_t nv, int half_dim, int seq, int heads, int batched, float sign) {
    const size_t per_row = half_dim / V;
    GRID_STRIDE(i, nv) {
        const size_t r = i / per_row;
        const size_t j = (i - r * per_row) * V;
        const size_t pos = r % seq;
        const size_t t = (batched ? r / ((size_t)heads * seq) * seq : 0) + pos;
        const size_t xo = r * 2 * half_dim + j, to = t * half_dim + j;
        float x1[V], x2[V], c[V], s[V];
        load<T, V>(x + xo, x1);
        load<T, V>(x + xo + half_dim, x2);
        load<T, V>(cos_t + to, c);
        load<T, V>(sin_t + to, s);
#pragma unroll
        for (int k = 0; k < V; k++) {
            const float sn = sign * s[k], a = x1[k], b = x2[k];
            x1[k] = a * c[k] - b * sn;
            x2[k] = b * c[k] + a * sn;
        }
        store<T, V>(y + xo, x1);
        store<T, V>(y + xo + half_dim, x2);
    }
}

#define ELEMENTWISE_KERNELS_V(NAME, T, V, SUF)                                                                \
    extern "C" __global__ void swiglu_fwd_##NAME##_##SUF(const T* g, const T* u, T* y, unsigned long long nv) { \
        swiglu_fwd<T, V>(g, u, y, nv);                                                                        \
    }                                                                                                         \
    extern "C" __global__ void swiglu_bwd_##NAME##_##SUF(const T* g, const T* u, const T* dy, T* dg, T* du,   \
                                                         unsigned long long nv) {                             \
        swiglu_bwd<T, V>(g, u, dy, dg, du, nv);                                                               \
    }                                                                                                         \
    extern "C" __global__ void rope_##NAME##_##SUF(const T* x, const T* cos_t, const T* sin_t, T* y,          \
                                                   unsigned long long nv, int half_dim, int seq, int heads,   \
                                                   int batched, float sign) {                                 \
        rope<T, V>(x, cos_t, sin_t, y, nv, half_dim, seq, heads, batched, sign);                              \
    }
#define ELEMENTWISE_KERNELS(NAME, T, V) ELEMENTWISE_KERNELS_V(NAME, T, V, v) ELEMENTWISE_KERNELS_V(NAME, T, 1, s)
MC_FOR_TYPES(ELEMENTWISE_KERNELS)
