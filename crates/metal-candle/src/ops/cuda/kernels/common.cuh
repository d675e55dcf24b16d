// Shared helpers for the row kernels: element conversion, 16-byte packs, block reductions.
//
// Every row kernel keeps a row in registers (R packs of V elements per thread), or for the
// staged norm backward in shared memory, so that the data is read once and written once; rows
// longer than blockDim * R * V take a looping path that re-reads the row (correct for any
// length, slower).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// V consecutive elements, aligned so that one load or store moves all of them (16 bytes for
// V = 16 / sizeof(T); the host picks V = 1 when a pointer or the row length is not aligned).
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <typename T, int V>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[V]) {
    Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int i = 0; i < V; i++) out[i] = to_f(pk.v[i]);
}

// A pack as stored, for holding a row in registers: a 16-bit pack takes half the registers
// of its f32 values (converted where used, which costs a shift or two per element).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_raw(const T* __restrict__ p) {
    return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& pk, float (&out)[V]) {
#pragma unroll
    for (int i = 0; i < V; i++) out[i] = to_f(pk.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[V]) {
    Pack<T, V> pk;
#pragma unroll
    for (int i = 0; i < V; i++) pk.v[i] = from_f<T>(in[i]);
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Packs of V elements a row kernel's thread keeps in registers: `elems` elements whatever the
// type (a 16-bit row takes half the packs per thread of an f32 row), `scalar` packs for V = 1.
// The host's copy, and why, is `row_packs` in common.rs.
__host__ __device__ constexpr int row_packs(int v, int elems, int scalar) { return v == 1 ? scalar : elems / v; }

struct SumOp { __device__ __forceinline__ float operator()(float a, float b) const { return a + b; } };
struct MaxOp { __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// The body of a block reduction of K values: shuffles within each warp, the warps' partials
// through `slot` (K * 32 floats) and one barrier, shuffles again; every thread gets the results.
// blockDim.x must be a multiple of 32. `lead`: a barrier first, for a slot that the previous
// reduction may still be reading.
template <int K, typename Op>
__device__ __forceinline__ void reduce_through(float (&v)[K], Op op, float identity, float* slot, bool lead) {
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
    const int nw = blockDim.x >> 5;
    if (nw == 1) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lead) __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < K; k++) slot[k * 32 + warp] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; k++) {
        float t = lane < nw ? slot[k * 32 + lane] : identity;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t = op(t, __shfl_xor_sync(0xffffffffu, t, o));
        v[k] = t;
    }
}

// Reduces K values across the block; every thread gets the results. `shm` holds K * 32 floats.
// Safe to call repeatedly (leading barrier).
template <int K, typename Op>
__device__ __forceinline__ void block_reduce(float (&v)[K], Op op, float identity, float* shm) {
    reduce_through<K>(v, op, identity, shm, true);
}

// Block reductions of a row kernel, one barrier each where `block_reduce` takes two. The warps'
// partials go to one of two slots, alternately, so a reduction never overwrites the slot the
// previous one may still be reading (the previous reduction's barrier lies between). A kernel
// that reduces twice per row (softmax) spends its time on four barriers otherwise: at
// 8×2048×4096 bf16 (H200) the forward pass went from 84 to 70 µs. `shm` holds 2 * KMAX * 32
// floats; K of each reduction is at most KMAX.
template <int KMAX>
struct RowReducer {
    float* shm;
    int parity;
    __device__ __forceinline__ explicit RowReducer(float* s) : shm(s), parity(0) {}

    template <int K, typename Op>
    __device__ __forceinline__ void reduce(float (&v)[K], Op op, float identity) {
        static_assert(K <= KMAX, "a reduction wider than the reducer's slots");
        float* slot = shm + parity * KMAX * 32;
        parity ^= 1;
        reduce_through<K>(v, op, identity, slot, false);
    }

    template <typename Op>
    __device__ __forceinline__ float reduce1(float v, Op op, float identity) {
        float a[1] = {v};
        reduce<1>(a, op, identity);
        return a[0];
    }
};

// A 16-byte copy from global to shared memory that does not wait for the data (cp.async, sm_80
// and later; a plain copy before): a kernel starts the next row's loads, then works on the row
// it has. `copy_wait<N>` waits until at most N of the groups committed by this thread are
// pending; the data is then visible to this thread only.
__device__ __forceinline__ void copy_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
    *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void copy_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <typename Op>
__device__ __forceinline__ float block_reduce1(float v, Op op, float identity, float* shm) {
    float a[1] = {v};
    block_reduce<1>(a, op, identity, shm);
    return a[0];
}

// Sums the per-block partial rows part[g * n + c] over g into out[c] (weight gradients):
// 32 columns per block, blockDim.y threads splitting the partial rows, no atomics.
template <typename T>
__device__ __forceinline__ void reduce_partials(const float* __restrict__ part, int groups, int n, T* __restrict__ out) {
    __shared__ float shm[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < n)
        for (int g = threadIdx.y; g < groups; g += blockDim.y) s += part[(size_t)g * n + c];
    shm[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0) {
        float t = 0.f;
        for (int y = 0; y < (int)blockDim.y; y++) t += shm[y][threadIdx.x];
        if (c < n) out[c] = from_f<T>(t);
    }
}

// Instantiates a kernel template for the three storage types, vectorised (16-byte packs)
// and scalar, as extern "C" symbols NAME_{f32,bf16,f16}_{v,s}.
#define MC_FOR_TYPES(MACRO) \
    MACRO(f32, float, 4)     \
    MACRO(bf16, __nv_bfloat16, 8) \
    MACRO(f16, __half, 8)
