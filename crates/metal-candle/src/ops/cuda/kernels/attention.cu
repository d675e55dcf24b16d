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
