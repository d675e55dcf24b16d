// Row-kernel lab: the shipped row kernels (norm.cu, softmax.cu) against candidate variants on
// one GPU, in one process, bf16 at 8×2048×4096 (rows = 16384, n = 4096). Each variant's output
// is compared with the shipped kernel's; times are medians of event-timed batches.
//
//   nvcc -arch=sm_90 -O3 -std=c++17 bench/kernel-lab/rowlab.cu -o rowlab && ./rowlab
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "../../crates/metal-candle/src/ops/cuda/kernels/norm.cu"
#include "../../crates/metal-candle/src/ops/cuda/kernels/softmax.cu"
#include "lab.cuh"

// ---------------------------------------------------------------------------------------------
// Helpers of the variants.

// RowReducer's reduction for the variants below, with slots of K * 32 floats (a kernel uses one K
// throughout, so its two slots never overlap).
template <int K, typename Op>
__device__ __forceinline__ void reduce_alt(float (&v)[K], Op op, float identity, float* shm, int& parity) {
    reduce_through<K>(v, op, identity, shm + parity * K * 32, false);
    parity ^= 1;
}

// ---------------------------------------------------------------------------------------------
// Softmax forward. One block per row, R packs per thread (threads = nv / R), the reductions with
// one barrier each. RAW: the row held as stored and the exponentials computed twice.
template <typename T, int V, int R, bool RAW>
__global__ void sm_fwd_lab(const T* __restrict__ x0, T* __restrict__ y0, int rows, int n) {
    __shared__ float shm[2 * 32];
    int par = 0;
    const int nv = n / V;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = x0 + (size_t)row * n;
        T* y = y0 + (size_t)row * n;
        if (RAW) {
            Pack<T, V> xr[R];
#pragma unroll
            for (int r = 0; r < R; r++) xr[r] = load_raw<T, V>(x + (size_t)(threadIdx.x + r * blockDim.x) * V);
            float m[1] = {-INFINITY};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) m[0] = fmaxf(m[0], to_f(xr[r].v[k]));
            reduce_alt<1>(m, MaxOp(), -INFINITY, shm, par);
            float s[1] = {0.f};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) s[0] += __expf(to_f(xr[r].v[k]) - m[0]);
            reduce_alt<1>(s, SumOp(), 0.f, shm, par);
            const float inv = 1.f / s[0];
#pragma unroll
            for (int r = 0; r < R; r++) {
                float t[V];
#pragma unroll
                for (int k = 0; k < V; k++) t[k] = __expf(to_f(xr[r].v[k]) - m[0]) * inv;
                store<T, V>(y + (size_t)(threadIdx.x + r * blockDim.x) * V, t);
            }
        } else {
            float v[R][V];
#pragma unroll
            for (int r = 0; r < R; r++) load<T, V>(x + (size_t)(threadIdx.x + r * blockDim.x) * V, v[r]);
            float m[1] = {-INFINITY};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) m[0] = fmaxf(m[0], v[r][k]);
            reduce_alt<1>(m, MaxOp(), -INFINITY, shm, par);
            float s[1] = {0.f};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) { v[r][k] = __expf(v[r][k] - m[0]); s[0] += v[r][k]; }
            reduce_alt<1>(s, SumOp(), 0.f, shm, par);
            const float inv = 1.f / s[0];
#pragma unroll
            for (int r = 0; r < R; r++) {
#pragma unroll
                for (int k = 0; k < V; k++) v[r][k] *= inv;
                store<T, V>(y + (size_t)(threadIdx.x + r * blockDim.x) * V, v[r]);
            }
        }
    }
    (void)nv;
}

// Forward, persistent blocks: the next row is copied into shared memory (cp.async) while the
// current one is reduced and written. OP: 0 softmax, 1 LayerNorm, 2 RMSNorm.
template <typename T, int V, int R, int OP>
__global__ void fwd_pf(const T* __restrict__ x0, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y0,
                       int rows, int n, float eps) {
    extern __shared__ __align__(16) unsigned char dsm[];
    __shared__ float shm[2 * 2 * 32];
    int par = 0;
    const int nv = n / V;
    Pack<T, V>* stage = reinterpret_cast<Pack<T, V>*>(dsm);  // [2][nv]
    int row = blockIdx.x;
    if (row < rows)
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            copy_async16(&stage[i], x0 + (size_t)row * n + (size_t)i * V);
        }
    copy_commit();
    for (int it = 0; row < rows; row += gridDim.x, it ^= 1) {
        const int next = row + gridDim.x;
        if (next < rows)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                copy_async16(&stage[(it ^ 1) * nv + i], x0 + (size_t)next * n + (size_t)i * V);
            }
        copy_commit();
        copy_wait<1>();
        T* y = y0 + (size_t)row * n;
        float v[R][V];
#pragma unroll
        for (int r = 0; r < R; r++) unpack<T, V>(stage[it * nv + threadIdx.x + r * blockDim.x], v[r]);
        if (OP == 0) {
            float m[1] = {-INFINITY};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) m[0] = fmaxf(m[0], v[r][k]);
            reduce_alt<1>(m, MaxOp(), -INFINITY, shm, par);
            float s[1] = {0.f};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) { v[r][k] = __expf(v[r][k] - m[0]); s[0] += v[r][k]; }
            reduce_alt<1>(s, SumOp(), 0.f, shm, par);
            const float inv = 1.f / s[0];
#pragma unroll
            for (int r = 0; r < R; r++) {
#pragma unroll
                for (int k = 0; k < V; k++) v[r][k] *= inv;
                store<T, V>(y + (size_t)(threadIdx.x + r * blockDim.x) * V, v[r]);
            }
        } else if (OP == 1) {
            const float c = to_f(x0[(size_t)row * n]);
            float s[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) { const float d = v[r][k] - c; s[0] += d; s[1] += d * d; }
            reduce_alt<2>(s, SumOp(), 0.f, shm, par);
            const float dm = s[0] / (float)n;
            const float mean = c + dm;
            const float rstd = rsqrtf(fmaxf(s[1] / (float)n - dm * dm, 0.f) + eps);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                float wv[V], bv[V];
                load<T, V>(w + (size_t)i * V, wv);
                load<T, V>(b + (size_t)i * V, bv);
#pragma unroll
                for (int k = 0; k < V; k++) v[r][k] = (v[r][k] - mean) * rstd * wv[k] + bv[k];
                store<T, V>(y + (size_t)i * V, v[r]);
            }
        } else {
            float s[1] = {0.f};
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int k = 0; k < V; k++) s[0] += v[r][k] * v[r][k];
            reduce_alt<1>(s, SumOp(), 0.f, shm, par);
            const float rstd = rsqrtf(s[0] / (float)n + eps);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                float wv[V];
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) v[r][k] = v[r][k] * rstd * wv[k];
                store<T, V>(y + (size_t)i * V, v[r]);
            }
        }
    }
    copy_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// LayerNorm forward: pivot statistics in one reduction, R packs per thread held as stored.
template <typename T, int V, int R>
__global__ void ln_fwd_lab(const T* __restrict__ x0, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y0,
                           int rows, int n, float eps) {
    __shared__ float shm[2 * 2 * 32];
    int par = 0;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = x0 + (size_t)row * n;
        T* y = y0 + (size_t)row * n;
        Pack<T, V> xr[R];
#pragma unroll
        for (int r = 0; r < R; r++) xr[r] = load_raw<T, V>(x + (size_t)(threadIdx.x + r * blockDim.x) * V);
        const float c = to_f(x[0]);
        float s[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int k = 0; k < V; k++) { const float d = to_f(xr[r].v[k]) - c; s[0] += d; s[1] += d * d; }
        reduce_alt<2>(s, SumOp(), 0.f, shm, par);
        const float dm = s[0] / (float)n;
        const float mean = c + dm;
        const float rstd = rsqrtf(fmaxf(s[1] / (float)n - dm * dm, 0.f) + eps);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            float o[V], wv[V], bv[V];
            load<T, V>(w + (size_t)i * V, wv);
            load<T, V>(b + (size_t)i * V, bv);
#pragma unroll
            for (int k = 0; k < V; k++) o[k] = (to_f(xr[r].v[k]) - mean) * rstd * wv[k] + bv[k];
            store<T, V>(y + (size_t)i * V, o);
        }
    }
}

// RMSNorm forward, same shape of code.
template <typename T, int V, int R>
__global__ void rms_fwd_lab(const T* __restrict__ x0, const T* __restrict__ w, T* __restrict__ y0, int rows, int n, float eps) {
    __shared__ float shm[2 * 32];
    int par = 0;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = x0 + (size_t)row * n;
        T* y = y0 + (size_t)row * n;
        Pack<T, V> xr[R];
#pragma unroll
        for (int r = 0; r < R; r++) xr[r] = load_raw<T, V>(x + (size_t)(threadIdx.x + r * blockDim.x) * V);
        float s[1] = {0.f};
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int k = 0; k < V; k++) { const float d = to_f(xr[r].v[k]); s[0] += d * d; }
        reduce_alt<1>(s, SumOp(), 0.f, shm, par);
        const float rstd = rsqrtf(s[0] / (float)n + eps);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            float o[V], wv[V];
            load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
            for (int k = 0; k < V; k++) o[k] = to_f(xr[r].v[k]) * rstd * wv[k];
            store<T, V>(y + (size_t)i * V, o);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, persistent blocks, the next row's x and dy copied into shared memory (cp.async)
// while the current row is reduced and written. R packs per thread (threads = nv / R).
template <typename T, int V, int R, bool LN, bool SACC = false>
__global__ void norm_bwd_pf(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
                            float* __restrict__ part_dw, float* __restrict__ part_db, int rows, int n, float eps) {
    extern __shared__ __align__(16) unsigned char dsm[];
    __shared__ float shm[2 * 4 * 32];
    int par = 0;
    const int nv = n / V;
    Pack<T, V>* sx = reinterpret_cast<Pack<T, V>*>(dsm);  // [2][nv]
    Pack<T, V>* sg = sx + 2 * nv;                         // [2][nv]
    // SACC: the weight-gradient sums in shared memory (each thread its own columns), not in
    // registers.
    float* sacc = reinterpret_cast<float*>(sg + 2 * nv);  // [2][n] when SACC
    float accw[SACC ? 1 : R][V], accb[SACC ? 1 : R][V];
    if (SACC) {
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int k = 0; k < V; k++) {
                const int c = (threadIdx.x + r * blockDim.x) * V + k;
                sacc[c] = 0.f;
                if (LN) sacc[n + c] = 0.f;
            }
    } else {
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int k = 0; k < V; k++) { accw[r][k] = 0.f; accb[r][k] = 0.f; }
    }
    int row = blockIdx.x;
    if (row < rows)
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = threadIdx.x + r * blockDim.x;
            copy_async16(&sx[i], x + (size_t)row * n + (size_t)i * V);
            copy_async16(&sg[i], dy + (size_t)row * n + (size_t)i * V);
        }
    copy_commit();
    for (int it = 0; row < rows; row += gridDim.x, it ^= 1) {
        const int next = row + gridDim.x;
        if (next < rows)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                copy_async16(&sx[(it ^ 1) * nv + i], x + (size_t)next * n + (size_t)i * V);
                copy_async16(&sg[(it ^ 1) * nv + i], dy + (size_t)next * n + (size_t)i * V);
            }
        copy_commit();
        copy_wait<1>();
        float xv[R][V], gv[R][V];
#pragma unroll
        for (int r = 0; r < R; r++) {
            unpack<T, V>(sx[it * nv + threadIdx.x + r * blockDim.x], xv[r]);
            unpack<T, V>(sg[it * nv + threadIdx.x + r * blockDim.x], gv[r]);
        }
        T* dr = dx + (size_t)row * n;
        if (LN) {
            const float p = to_f(x[(size_t)row * n]);
            float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wv[V];
                load<T, V>(w + (size_t)(threadIdx.x + r * blockDim.x) * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float d = xv[r][k] - p, g = gv[r][k] * wv[k];
                    s[0] += d; s[1] += d * d; s[2] += g; s[3] += g * d;
                }
            }
            reduce_alt<4>(s, SumOp(), 0.f, shm, par);
            const float dm = s[0] / (float)n;
            const float mean = p + dm;
            const float rstd = rsqrtf(fmaxf(s[1] / (float)n - dm * dm, 0.f) + eps);
            const float mg = s[2] / (float)n;
            const float mgx = (s[3] - dm * s[2]) * rstd / (float)n;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                float wv[V], o[V];
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float xh = (xv[r][k] - mean) * rstd;
                    o[k] = rstd * (gv[r][k] * wv[k] - mg - xh * mgx);
                    if (SACC) {
                        sacc[i * V + k] += gv[r][k] * xh;
                        sacc[n + i * V + k] += gv[r][k];
                    } else {
                        accw[r][k] += gv[r][k] * xh;
                        accb[r][k] += gv[r][k];
                    }
                }
                store<T, V>(dr + (size_t)i * V, o);
            }
        } else {
            float s[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wv[V];
                load<T, V>(w + (size_t)(threadIdx.x + r * blockDim.x) * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) { s[0] += xv[r][k] * xv[r][k]; s[1] += gv[r][k] * wv[k] * xv[r][k]; }
            }
            reduce_alt<2>(s, SumOp(), 0.f, shm, par);
            const float rstd = rsqrtf(s[0] / (float)n + eps);
            const float c = s[1] * rstd * rstd / (float)n;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                float wv[V], o[V];
                load<T, V>(w + (size_t)i * V, wv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    o[k] = rstd * (gv[r][k] * wv[k] - xv[r][k] * c);
                    if (SACC) sacc[i * V + k] += gv[r][k] * xv[r][k] * rstd;
                    else accw[r][k] += gv[r][k] * xv[r][k] * rstd;
                }
                store<T, V>(dr + (size_t)i * V, o);
            }
        }
    }
    copy_wait<0>();
    float* pw = part_dw + (size_t)blockIdx.x * n;
    float* pb = LN ? part_db + (size_t)blockIdx.x * n : nullptr;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = threadIdx.x + r * blockDim.x;
#pragma unroll
        for (int k = 0; k < V; k++) {
            pw[(size_t)i * V + k] = SACC ? sacc[i * V + k] : accw[SACC ? 0 : r][k];
            if (LN) pb[(size_t)i * V + k] = SACC ? sacc[n + i * V + k] : accb[SACC ? 0 : r][k];
        }
    }
}

// Backward, two rows per iteration held in registers as loaded (no shared-memory staging):
// both rows' loads in flight together, one reduction for both.
template <typename T, int V, int R, bool LN>
__global__ void norm_bwd_2row(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
                              float* __restrict__ part_dw, float* __restrict__ part_db, int rows, int n, float eps) {
    __shared__ float shm[2 * 8 * 32];
    int par = 0;
    float accw[R][V], accb[R][V];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int k = 0; k < V; k++) { accw[r][k] = 0.f; accb[r][k] = 0.f; }
    for (int row = 2 * blockIdx.x; row < rows; row += 2 * gridDim.x) {
        const int nrows = min(2, rows - row);
        Pack<T, V> xr[2][R], gr[2][R];
#pragma unroll
        for (int q = 0; q < 2; q++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const size_t o = (size_t)(row + (q < nrows ? q : 0)) * n + (size_t)(threadIdx.x + r * blockDim.x) * V;
                xr[q][r] = load_raw<T, V>(x + o);
                gr[q][r] = load_raw<T, V>(dy + o);
            }
        float s[2][4];
        float piv[2];
#pragma unroll
        for (int q = 0; q < 2; q++) {
            piv[q] = LN ? to_f(x[(size_t)(row + (q < nrows ? q : 0)) * n]) : 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++) s[q][j] = 0.f;
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            float wv[V];
            load<T, V>(w + (size_t)(threadIdx.x + r * blockDim.x) * V, wv);
#pragma unroll
            for (int q = 0; q < 2; q++) {
                float xv[V], gv[V];
                unpack<T, V>(xr[q][r], xv);
                unpack<T, V>(gr[q][r], gv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    if (LN) {
                        const float d = xv[k] - piv[q], g = gv[k] * wv[k];
                        s[q][0] += d; s[q][1] += d * d; s[q][2] += g; s[q][3] += g * d;
                    } else {
                        s[q][0] += xv[k] * xv[k]; s[q][1] += gv[k] * wv[k] * xv[k];
                    }
                }
            }
        }
        constexpr int K = LN ? 8 : 4;
        float flat[K];
#pragma unroll
        for (int q = 0; q < 2; q++)
#pragma unroll
            for (int j = 0; j < K / 2; j++) flat[q * (K / 2) + j] = s[q][j];
        reduce_alt<K>(flat, SumOp(), 0.f, shm, par);
#pragma unroll
        for (int q = 0; q < 2; q++) {
            if (q >= nrows) break;
            const float* f = flat + q * (K / 2);
            float mean = 0.f, rstd, mg = 0.f, mgx;
            if (LN) {
                const float dm = f[0] / (float)n;
                mean = piv[q] + dm;
                rstd = rsqrtf(fmaxf(f[1] / (float)n - dm * dm, 0.f) + eps);
                mg = f[2] / (float)n;
                mgx = (f[3] - dm * f[2]) * rstd / (float)n;
            } else {
                rstd = rsqrtf(f[0] / (float)n + eps);
                mgx = f[1] * rstd * rstd / (float)n;
            }
            T* dr = dx + (size_t)(row + q) * n;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int i = threadIdx.x + r * blockDim.x;
                float wv[V], o[V], xv[V], gv[V];
                load<T, V>(w + (size_t)i * V, wv);
                unpack<T, V>(xr[q][r], xv);
                unpack<T, V>(gr[q][r], gv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    if (LN) {
                        const float xh = (xv[k] - mean) * rstd;
                        o[k] = rstd * (gv[k] * wv[k] - mg - xh * mgx);
                        accw[r][k] += gv[k] * xh;
                        accb[r][k] += gv[k];
                    } else {
                        o[k] = rstd * (gv[k] * wv[k] - xv[k] * mgx);
                        accw[r][k] += gv[k] * xv[k] * rstd;
                    }
                }
                store<T, V>(dr + (size_t)i * V, o);
            }
        }
    }
    float* pw = part_dw + (size_t)blockIdx.x * n;
    float* pb = LN ? part_db + (size_t)blockIdx.x * n : nullptr;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = threadIdx.x + r * blockDim.x;
#pragma unroll
        for (int k = 0; k < V; k++) {
            pw[(size_t)i * V + k] = accw[r][k];
            if (LN) pb[(size_t)i * V + k] = accb[r][k];
        }
    }
}

// The shipped staged backward with a ring of S slots (S − 1 rows in flight ahead).
template <bool LN, int S>
__global__ void staged_ring(const bf* x, const bf* w, const bf* dy, bf* dx, float* pw, float* pb, int rows, int n, float eps) {
    norm_bwd_staged<bf, 8, LN, S>(x, w, dy, dx, pw, pb, nullptr, rows, n, eps);
}

// LayerNorm backward with the row statistics saved by the forward pass (mean and 1/std per row,
// as PyTorch keeps them), so that a row reduces two sums (Σg, Σg·x̂) instead of four, and no pivot
// is loaded. Otherwise the shipped staged kernel: the next row copied into shared memory with
// cp.async while this one is worked on, each thread reading back only the packs it copied.
__global__ void ln_stats(const bf* __restrict__ x, float2* __restrict__ stats, int rows, int n, float eps) {
    __shared__ float shm[2 * 32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        float s = 0.f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) s += __bfloat162float(x[(size_t)row * n + i]);
        const float mean = block_reduce1(s, SumOp(), 0.f, shm) / n;
        float v = 0.f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float d = __bfloat162float(x[(size_t)row * n + i]) - mean;
            v += d * d;
        }
        const float var = block_reduce1(v, SumOp(), 0.f, shm) / n;
        if (threadIdx.x == 0) stats[row] = make_float2(mean, rsqrtf(var + eps));
    }
}

// RP: packs per thread; WREG: the weight's packs loaded once, before the rows, and kept in registers.
template <int STAGES, int RP = 2, bool WREG = false>
__global__ void ln_bwd_saved(const bf* __restrict__ x, const bf* __restrict__ w, const bf* __restrict__ dy,
                             bf* __restrict__ dx, float* __restrict__ part_dw, float* __restrict__ part_db,
                             const float2* __restrict__ stats, int rows, int n) {
    constexpr int V = 8, R = RP;
    extern __shared__ __align__(16) unsigned char stage_mem[];
    __shared__ float shm[2 * 2 * 32];
    RowReducer<2> red(shm);
    const int nv = n / V;
    Pack<bf, V>* sx = reinterpret_cast<Pack<bf, V>*>(stage_mem);
    Pack<bf, V>* sg = sx + STAGES * nv;
    float2 st[STAGES];
    auto stage_row = [&](int r, int slot, float2& s) {
        if (r < rows) {
#pragma unroll
            for (int q = 0; q < R; q++) {
                const int i = threadIdx.x + q * blockDim.x;
                if (i < nv) {
                    copy_async16(&sx[slot * nv + i], x + (size_t)r * n + (size_t)i * V);
                    copy_async16(&sg[slot * nv + i], dy + (size_t)r * n + (size_t)i * V);
                }
            }
            s = stats[r];
        }
        copy_commit();
    };
    float accw[R][V], accb[R][V];
#pragma unroll
    for (int q = 0; q < R; q++)
#pragma unroll
        for (int k = 0; k < V; k++) { accw[q][k] = 0.f; accb[q][k] = 0.f; }
    Pack<bf, V> wr[R];
    if (WREG) {
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int i = threadIdx.x + q * blockDim.x;
            if (i < nv) wr[q] = load_raw<bf, V>(w + (size_t)i * V);
        }
    }
    auto wpack = [&](int q, int i, float (&wv)[V]) {
        if (WREG) unpack<bf, V>(wr[q], wv);
        else load<bf, V>(w + (size_t)i * V, wv);
    };
    int row = blockIdx.x;
#pragma unroll
    for (int j = 0; j < STAGES - 1; j++) stage_row(row + j * gridDim.x, j, st[j]);
    for (int slot = 0; row < rows; row += gridDim.x, slot = slot + 1 == STAGES ? 0 : slot + 1) {
        const int ahead_slot = slot == 0 ? STAGES - 1 : slot - 1;
        stage_row(row + (STAGES - 1) * gridDim.x, ahead_slot, st[STAGES - 1]);
        copy_wait<STAGES - 1>();
        const float mean = st[0].x, rstd = st[0].y;
        auto row_pack = [&](int i, float (&xo)[V], float (&go)[V]) {
            unpack<bf, V>(load_raw<bf, V>(reinterpret_cast<const bf*>(&sx[slot * nv + i])), xo);
            unpack<bf, V>(load_raw<bf, V>(reinterpret_cast<const bf*>(&sg[slot * nv + i])), go);
        };
        float s[2] = {0.f, 0.f};
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int i = threadIdx.x + q * blockDim.x;
            if (i < nv) {
                float wv[V], xq[V], gq[V];
                wpack(q, i, wv);
                row_pack(i, xq, gq);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float g = gq[k] * wv[k];
                    s[0] += g;
                    s[1] += g * (xq[k] - mean);
                }
            }
        }
        red.reduce<2>(s, SumOp(), 0.f);
        const float mg = s[0] / (float)n, c = s[1] * rstd / (float)n;
        bf* dr = dx + (size_t)row * n;
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int i = threadIdx.x + q * blockDim.x;
            if (i < nv) {
                float wv[V], o[V], xq[V], gq[V];
                wpack(q, i, wv);
                row_pack(i, xq, gq);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    const float xh = (xq[k] - mean) * rstd;
                    o[k] = rstd * (gq[k] * wv[k] - mg - xh * c);
                    accw[q][k] += gq[k] * xh;
                    accb[q][k] += gq[k];
                }
                store<bf, V>(dr + (size_t)i * V, o);
            }
        }
#pragma unroll
        for (int j = 0; j + 1 < STAGES; j++) st[j] = st[j + 1];
    }
#pragma unroll
    for (int q = 0; q < R; q++) {
        const int i = threadIdx.x + q * blockDim.x;
        if (i < nv)
#pragma unroll
            for (int k = 0; k < V; k++) {
                part_dw[(size_t)blockIdx.x * n + (size_t)i * V + k] = accw[q][k];
                part_db[(size_t)blockIdx.x * n + (size_t)i * V + k] = accb[q][k];
            }
    }
}

// ---------------------------------------------------------------------------------------------
// Harness.

static cudaEvent_t ev0, ev1;

static float time_us(const std::function<void()>& launch, int per_batch = 10, int batches = 21) {
    for (int i = 0; i < 5; i++) launch();
    CK(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int b = 0; b < batches; b++) {
        CK(cudaEventRecord(ev0));
        for (int i = 0; i < per_batch; i++) launch();
        CK(cudaEventRecord(ev1));
        CK(cudaEventSynchronize(ev1));
        float ms;
        CK(cudaEventElapsedTime(&ms, ev0, ev1));
        t.push_back(ms * 1000.f / per_batch);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static std::vector<float> to_host(const bf* d, size_t n) {
    std::vector<bf> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(bf), cudaMemcpyDeviceToHost));
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++) out[i] = __bfloat162float(h[i]);
    return out;
}

// Largest |a − b| / (1 + |b|).
static double diff(const std::vector<float>& a, const std::vector<float>& b) {
    double m = 0;
    for (size_t i = 0; i < a.size(); i++) {
        const double d = std::fabs((double)a[i] - b[i]) / (1.0 + std::fabs((double)b[i]));
        if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;
    }
    return m;
}

static double copy_gbps_ref = 0;
static void report(const char* name, float us, double bytes, double err) {
    const double gbps = bytes / (us * 1e-6) / 1e9;
    printf("%-34s %8.1f us %7.0f GB/s %5.1f%% of copy  diff %.2e\n", name, us, gbps, 100.0 * gbps / copy_gbps_ref, err);
    fflush(stdout);
}

int main(int argc, char** argv) {
    // `rowlab ln-bwd`: only the backward section (the staged kernels and the saved-stats variant).
    const bool only_ln_bwd = argc > 1 && std::string(argv[1]) == "ln-bwd";
    const int rows = 16384, n = 4096;
    const size_t N = (size_t)rows * n;
    const float eps = 1e-5f;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs, bf16 rows %d n %d\n", prop.name, sms, rows, n);
    CK(cudaEventCreate(&ev0));
    CK(cudaEventCreate(&ev1));
    bf *x, *dy, *y, *yref, *w, *b;
    CK(cudaMalloc(&x, N * 2)); CK(cudaMalloc(&dy, N * 2)); CK(cudaMalloc(&y, N * 2)); CK(cudaMalloc(&yref, N * 2));
    CK(cudaMalloc(&w, n * 2)); CK(cudaMalloc(&b, n * 2));
    fill<<<1024, 256>>>(x, N, 1, 3.f, 0.5f);
    fill<<<1024, 256>>>(dy, N, 2, 1.f, 0.f);
    fill<<<16, 256>>>(w, n, 3, 0.5f, 1.f);
    fill<<<16, 256>>>(b, n, 4, 0.5f, 0.f);
    const int G_MAX = sms * 16;
    float *pw, *pb, *pw2, *pb2;
    CK(cudaMalloc(&pw, (size_t)G_MAX * n * 4)); CK(cudaMalloc(&pb, (size_t)G_MAX * n * 4));
    CK(cudaMalloc(&pw2, (size_t)G_MAX * n * 4)); CK(cudaMalloc(&pb2, (size_t)G_MAX * n * 4));
    bf *dw, *db, *dwref, *dbref;
    CK(cudaMalloc(&dw, n * 2)); CK(cudaMalloc(&db, n * 2)); CK(cudaMalloc(&dwref, n * 2)); CK(cudaMalloc(&dbref, n * 2));
    CK(cudaDeviceSynchronize());

    // The copy ceiling: a device-to-device copy of the same bytes.
    const float copy_us = time_us([&] { CK(cudaMemcpyAsync(y, x, N * 2, cudaMemcpyDeviceToDevice)); });
    copy_gbps_ref = 2.0 * N * 2 / (copy_us * 1e-6) / 1e9;
    printf("%-34s %8.1f us %7.0f GB/s\n", "memcpy d2d (read+write)", copy_us, copy_gbps_ref);
    const double fwd_bytes = 2.0 * N * 2, bwd_bytes = 3.0 * N * 2;
    const int nv = n / 8;
    auto clear = [&](bf* p) { CK(cudaMemset(p, 0xff, N * 2)); };
    // A persistent forward kernel at several blocks per SM.
    auto pf_fwd = [&](auto& run, auto kern, int R, const char* kind) {
        const int threads = nv / R, smem = 2 * nv * 16;
        int occ;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, threads, smem));
        for (int per : {occ / 2, occ * 3 / 4, occ}) {
            if (per < 1) continue;
            char name[64];
            snprintf(name, sizeof name, "%s fwd pf R%d (%d) %d/SM", kind, R, threads, per);
            run(name, [&] { kern<<<sms * per, threads, smem>>>(x, w, b, y, rows, n, eps); });
        }
    };

    if (!only_ln_bwd) {
    // ---- softmax forward
    {
        clear(yref);
        const float t = time_us([&] { softmax_fwd_bf16_v<<<rows, nv / 4>>>(x, yref, rows, n); });
        auto ref = to_host(yref, N);
        report("softmax fwd shipped (128 thr)", t, fwd_bytes, 0);
        auto run = [&](const char* name, const std::function<void()>& f) {
            clear(y);
            const float t = time_us(f);
            report(name, t, fwd_bytes, diff(to_host(y, N), ref));
        };
        run("softmax fwd alt R2 (256)", [&] { sm_fwd_lab<bf, 8, 2, false><<<rows, nv / 2>>>(x, y, rows, n); });
        run("softmax fwd alt R4 (128)", [&] { sm_fwd_lab<bf, 8, 4, false><<<rows, nv / 4>>>(x, y, rows, n); });
        run("softmax fwd alt R8 (64)", [&] { sm_fwd_lab<bf, 8, 8, false><<<rows, nv / 8>>>(x, y, rows, n); });
        run("softmax fwd alt R1 (512)", [&] { sm_fwd_lab<bf, 8, 1, false><<<rows, nv / 1>>>(x, y, rows, n); });
        run("softmax fwd raw R4 (128)", [&] { sm_fwd_lab<bf, 8, 4, true><<<rows, nv / 4>>>(x, y, rows, n); });
        run("softmax fwd raw R8 (64)", [&] { sm_fwd_lab<bf, 8, 8, true><<<rows, nv / 8>>>(x, y, rows, n); });
        run("softmax fwd raw R16 (warp)", [&] { sm_fwd_lab<bf, 8, 16, true><<<rows, nv / 16>>>(x, y, rows, n); });
        pf_fwd(run, fwd_pf<bf, 8, 2, 0>, 2, "softmax");
        pf_fwd(run, fwd_pf<bf, 8, 4, 0>, 4, "softmax");
    }
    // ---- LayerNorm forward
    {
        clear(yref);
        const float t = time_us([&] { layer_fwd_bf16_v<<<rows, nv / 4>>>(x, w, b, yref, nullptr, rows, n, eps); });
        auto ref = to_host(yref, N);
        report("layer fwd shipped (128 thr)", t, fwd_bytes, 0);
        auto run = [&](const char* name, const std::function<void()>& f) {
            clear(y);
            const float t = time_us(f);
            report(name, t, fwd_bytes, diff(to_host(y, N), ref));
        };
        run("layer fwd alt R2 (256)", [&] { ln_fwd_lab<bf, 8, 2><<<rows, nv / 2>>>(x, w, b, y, rows, n, eps); });
        run("layer fwd alt R4 (128)", [&] { ln_fwd_lab<bf, 8, 4><<<rows, nv / 4>>>(x, w, b, y, rows, n, eps); });
        run("layer fwd alt R8 (64)", [&] { ln_fwd_lab<bf, 8, 8><<<rows, nv / 8>>>(x, w, b, y, rows, n, eps); });
        run("layer fwd alt R16 (warp)", [&] { ln_fwd_lab<bf, 8, 16><<<rows, nv / 16>>>(x, w, b, y, rows, n, eps); });
        run("layer fwd alt R1 (512)", [&] { ln_fwd_lab<bf, 8, 1><<<rows, nv>>>(x, w, b, y, rows, n, eps); });
        pf_fwd(run, fwd_pf<bf, 8, 2, 1>, 2, "layer");
        pf_fwd(run, fwd_pf<bf, 8, 4, 1>, 4, "layer");
    }
    // ---- RMSNorm forward
    {
        clear(yref);
        const float t = time_us([&] { rms_fwd_bf16_v<<<rows, nv / 4>>>(x, w, yref, rows, n, eps); });
        auto ref = to_host(yref, N);
        report("rms fwd shipped (128 thr)", t, fwd_bytes, 0);
        auto run = [&](const char* name, const std::function<void()>& f) {
            clear(y);
            const float t = time_us(f);
            report(name, t, fwd_bytes, diff(to_host(y, N), ref));
        };
        run("rms fwd alt R2 (256)", [&] { rms_fwd_lab<bf, 8, 2><<<rows, nv / 2>>>(x, w, y, rows, n, eps); });
        run("rms fwd alt R4 (128)", [&] { rms_fwd_lab<bf, 8, 4><<<rows, nv / 4>>>(x, w, y, rows, n, eps); });
        run("rms fwd alt R8 (64)", [&] { rms_fwd_lab<bf, 8, 8><<<rows, nv / 8>>>(x, w, y, rows, n, eps); });
        pf_fwd(run, fwd_pf<bf, 8, 2, 2>, 2, "rms");
    }
    }
    // ---- backward (main kernel + column reductions)
    for (int ln = 0; ln < 2; ln++) {
        const char* kind = ln ? "layer" : "rms";
        int per;
        auto shipped = ln ? (void*)layer_bwd_bf16_v : (void*)rms_bwd_bf16_v;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, shipped, nv, 0));
        const int G = sms * per;
        auto reduce = [&](int groups, float* p, float* q, bf* ow, bf* ob) {
            reduce_cols_bf16<<<n / 32, dim3(32, 32)>>>(p, groups, n, ow);
            if (ln) reduce_cols_bf16<<<n / 32, dim3(32, 32)>>>(q, groups, n, ob);
        };
        clear(yref);
        const float t = time_us([&] {
            if (ln) layer_bwd_bf16_v<<<G, nv>>>(x, w, dy, yref, pw, pb, rows, n, eps);
            else rms_bwd_bf16_v<<<G, nv>>>(x, w, dy, yref, pw, rows, n, eps);
            reduce(G, pw, pb, dwref, dbref);
        });
        auto ref = to_host(yref, N);
        auto refw = to_host(dwref, n), refb = to_host(dbref, n);
        char name[96];
        snprintf(name, sizeof name, "%s bwd registers (512 thr, %d/SM)", kind, per);
        report(name, t, bwd_bytes, 0);
        // The shipped staged kernel (as norm.rs launches it: the most blocks per SM that fit)
        // and the variant holding its rows in registers, at several blocks per SM.
        auto staged = [&](void* kern, const char* what, bool all_occ, bool has_pb, int stages) {
            const int threads = nv / 2, smem = 2 * stages * n * 2;
            CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            int occ;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, threads, smem));
            for (int p = all_occ ? 1 : occ; p <= occ; p++) {
                const int g = sms * p;
                char nm[96];
                snprintf(nm, sizeof nm, "%s bwd %s (%d thr) %d/SM%s", kind, what, threads, p, p == occ ? " max" : "");
                clear(y);
                const float ts = time_us([&] {
                    void* args[] = {(void*)&x, (void*)&w, (void*)&dy, (void*)&y, (void*)&pw2, (void*)&pb2,
                                    (void*)&rows, (void*)&n, (void*)&eps};
                    if (!has_pb) args[5] = (void*)&rows, args[6] = (void*)&n, args[7] = (void*)&eps;
                    CK(cudaLaunchKernel(kern, g, threads, args, smem, 0));
                    reduce(g, pw2, pb2, dw, db);
                });
                double e = std::max(diff(to_host(y, N), ref), diff(to_host(dw, n), refw));
                if (ln) e = std::max(e, diff(to_host(db, n), refb));
                report(nm, ts, bwd_bytes, e);
            }
        };
        staged(ln ? (void*)layer_bwd_staged_bf16 : (void*)rms_bwd_staged_bf16, "shipped staged", true, ln, 2);
        staged(ln ? (void*)staged_ring<true, 3> : (void*)staged_ring<false, 3>, "staged ring 3", true, true, 3);
        staged(ln ? (void*)staged_ring<true, 4> : (void*)staged_ring<false, 4>, "staged ring 4", true, true, 4);
        if (ln) {
            // Saved statistics: computed once here (the forward pass would write them).
            float2* stats;
            CK(cudaMalloc(&stats, (size_t)rows * sizeof(float2)));
            ln_stats<<<rows, 256>>>(x, stats, rows, n, eps);
            auto saved = [&](void* kern, int stages, int rp = 2, const char* tag = "") {
                const int threads = nv / rp, smem = 2 * stages * n * 2;
                CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                int occ;
                CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, threads, smem));
                for (int p = 2; p <= occ; p++) {
                    const int g = sms * p;
                    char nm[96];
                    snprintf(nm, sizeof nm, "layer bwd saved S%d%s (%d thr) %d/SM%s", stages, tag, threads, p,
                             p == occ ? " max" : "");
                    clear(y);
                    const float ts = time_us([&] {
                        void* args[] = {(void*)&x, (void*)&w, (void*)&dy, (void*)&y, (void*)&pw2, (void*)&pb2,
                                        (void*)&stats, (void*)&rows, (void*)&n};
                        CK(cudaLaunchKernel(kern, g, threads, args, smem, 0));
                        reduce(g, pw2, pb2, dw, db);
                    });
                    const double e = std::max({diff(to_host(y, N), ref), diff(to_host(dw, n), refw),
                                               diff(to_host(db, n), refb)});
                    report(nm, ts, bwd_bytes, e);
                }
            };
            saved((void*)layer_bwd_saved_bf16, 2, 2, " shipped");
            saved((void*)ln_bwd_saved<2>, 2);
            saved((void*)ln_bwd_saved<3>, 3);
            saved((void*)ln_bwd_saved<2, 2, true>, 2, 2, " wreg");
            saved((void*)ln_bwd_saved<2, 4>, 2, 4, " R4");
            saved((void*)ln_bwd_saved<2, 4, true>, 2, 4, " R4 wreg");
            saved((void*)ln_bwd_saved<2, 1>, 2, 1, " R1");
            CK(cudaFree(stats));
        }
        if (only_ln_bwd) continue;
        auto run = [&](const char* name, int groups, const std::function<void()>& f) {
            clear(y);
            const float t = time_us([&] { f(); reduce(groups, pw2, pb2, dw, db); });
            double e = std::max(diff(to_host(y, N), ref), diff(to_host(dw, n), refw));
            if (ln) e = std::max(e, diff(to_host(db, n), refb));
            report(name, t, bwd_bytes, e);
        };
        auto pf = [&](auto kern, int R, int stage_packs, bool sacc = false) {
            const int threads = nv / R;
            const int smem = 2 * 2 * stage_packs * 16 + (sacc ? 2 * n * 4 : 0);
            CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            int occ;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, threads, smem));
            for (int p = 1; p <= occ; p++) {
                if (p != occ && p != occ - 1 && p != 1) continue;
                char nm[96];
                snprintf(nm, sizeof nm, "%s bwd pf%s R%d (%d thr) %d/SM", kind, sacc ? " sacc" : "", R, threads, p);
                const int g = sms * p;
                run(nm, g, [&] { kern<<<g, threads, smem>>>(x, w, dy, y, pw2, pb2, rows, n, eps); });
            }
        };
        if (ln) {
            pf(norm_bwd_pf<bf, 8, 1, true>, 1, nv);
            pf(norm_bwd_pf<bf, 8, 2, true>, 2, nv);
            pf(norm_bwd_pf<bf, 8, 1, true, true>, 1, nv, true);
            pf(norm_bwd_pf<bf, 8, 2, true, true>, 2, nv, true);
        } else {
            pf(norm_bwd_pf<bf, 8, 1, false>, 1, nv);
            pf(norm_bwd_pf<bf, 8, 2, false>, 2, nv);
            pf(norm_bwd_pf<bf, 8, 1, false, true>, 1, nv, true);
            pf(norm_bwd_pf<bf, 8, 2, false, true>, 2, nv, true);
        }
        auto two = [&](auto kern, int R) {
            const int threads = nv / R;
            int occ;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, threads, 0));
            for (int p = std::max(1, occ - 1); p <= occ; p++) {
                char nm[96];
                snprintf(nm, sizeof nm, "%s bwd 2row R%d (%d thr) %d/SM", kind, R, threads, p);
                const int g = std::min(sms * p, rows / 2);
                run(nm, g, [&] { kern<<<g, threads>>>(x, w, dy, y, pw2, pb2, rows, n, eps); });
            }
        };
        if (ln) {
            two(norm_bwd_2row<bf, 8, 1, true>, 1);
        } else {
            two(norm_bwd_2row<bf, 8, 1, false>, 1);
        }
    }
    printf("done\n");
    return 0;
}
