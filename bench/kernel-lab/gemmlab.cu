// LoRA-linear lab: where the forward's time above the bare base GEMM goes, bf16 at
// 8×2048×4096 (m = 16384 tokens, in = out = 4096), r = 16, in one process. The library's
// forward (ops/cuda/lora.rs) runs three cuBLAS GEMMs: t = scale·x·A (m × r), y = t·B (beta 0),
// then the base y = x·Wᵀ + 1·y (beta 1). This times each of them alone, the sequence, the base
// GEMM with beta 0, and the memory ceilings the two thin GEMMs are bound by (a read of x, a
// write of y, a device copy), all as medians of event-timed batches.
//
//   nvcc -arch=sm_90 -O3 -std=c++17 bench/kernel-lab/gemmlab.cu -lcublas -o gemmlab && ./gemmlab
// (on the GPU machine, libcublas.so.13 from PyTorch's nvidia/cu13/lib on LD_LIBRARY_PATH).
// Then the two thin GEMMs again through cuBLASLt, every algorithm its heuristic offers (up to
// 16), each timed: whether one runs closer to the memory ceiling than cublasGemmEx's choice.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>
#include "lab.cuh"

// Reads n bf16 values in 16-byte packs and writes one float per block: the read ceiling.
__global__ void read_all(const uint4* __restrict__ p, size_t packs, float* out) {
    float s = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < packs; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        s += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
    }
    if (s == 12345.f) out[blockIdx.x] = s;  // keeps the loads; never true for this data
}

static cudaEvent_t ev0, ev1;

static float time_us(const std::function<void()>& f, int per_batch = 10, int batches = 21) {
    for (int i = 0; i < 3; i++) f();
    CK(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int b = 0; b < batches; b++) {
        CK(cudaEventRecord(ev0));
        for (int i = 0; i < per_batch; i++) f();
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

// Row-major C[m×n] = alpha·op(A)·op(B) + beta·C through column-major cuBLAS (C ᵀ = op(B)ᵀ·op(A)ᵀ).
static void gemm(cublasHandle_t h, int m, int n, int k, const bf* a, bool ta, int lda, const bf* b, bool tb, int ldb,
                 bf* c, int ldc, float alpha, float beta) {
    CB(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, CUDA_R_16BF,
                    ldb, a, CUDA_R_16BF, lda, &beta, c, CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

int main() {
    const int m = 16384, in = 4096, out = 4096, r = 16;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, bf16, m %d in %d out %d r %d\n", prop.name, m, in, out, r);
    CK(cudaEventCreate(&ev0));
    CK(cudaEventCreate(&ev1));
    cublasHandle_t h;
    CB(cublasCreate(&h));
    bf *x, *w, *a, *b, *t, *y, *y2;
    float* sink;
    CK(cudaMalloc(&x, (size_t)m * in * 2)); CK(cudaMalloc(&w, (size_t)out * in * 2));
    CK(cudaMalloc(&a, (size_t)in * r * 2)); CK(cudaMalloc(&b, (size_t)r * out * 2));
    CK(cudaMalloc(&t, (size_t)m * r * 2)); CK(cudaMalloc(&y, (size_t)m * out * 2));
    CK(cudaMalloc(&y2, (size_t)m * out * 2)); CK(cudaMalloc(&sink, 1 << 20));
    fill<<<1024, 256>>>(x, (size_t)m * in, 1, 1.f);
    fill<<<1024, 256>>>(w, (size_t)out * in, 2, 0.02f);
    fill<<<64, 256>>>(a, (size_t)in * r, 3, 0.02f);
    fill<<<64, 256>>>(b, (size_t)r * out, 4, 0.02f);
    CK(cudaDeviceSynchronize());
    const double ybytes = (double)m * out * 2;
    auto report = [](const char* name, float us, double bytes) {
        if (bytes > 0) printf("%-44s %9.1f us  %7.0f GB/s\n", name, us, bytes / (us * 1e-6) / 1e9);
        else printf("%-44s %9.1f us\n", name, us);
    };
    const float copy = time_us([&] { CK(cudaMemcpyAsync(y2, y, ybytes, cudaMemcpyDeviceToDevice)); });
    report("copy of y (read + write)", copy, 2 * ybytes);
    const float rd = time_us([&] { read_all<<<132 * 8, 512>>>((const uint4*)x, (size_t)m * in / 8, sink); });
    report("read of x", rd, (double)m * in * 2);
    const float wr = time_us([&] { CK(cudaMemsetAsync(y2, 0, ybytes)); });
    report("write of y (memset)", wr, ybytes);
    const float base0 = time_us([&] { gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 0.f); });
    report("base y = x·Wᵀ (beta 0)", base0, 0);
    const float base1 = time_us([&] { gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 1.f); });
    report("base y = x·Wᵀ + y (beta 1)", base1, 0);
    const float xa = time_us([&] { gemm(h, m, r, in, x, false, in, a, false, r, t, r, 2.f, 0.f); });
    report("t = s·x·A (m×r)", xa, (double)m * in * 2);
    const float tb = time_us([&] { gemm(h, m, out, r, t, false, r, b, false, out, y, out, 1.f, 0.f); });
    report("y = t·B (beta 0)", tb, ybytes);
    const float seq = time_us([&] {
        gemm(h, m, r, in, x, false, in, a, false, r, t, r, 2.f, 0.f);
        gemm(h, m, out, r, t, false, r, b, false, out, y, out, 1.f, 0.f);
        gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 1.f);
    });
    report("the shipped sequence (t, t·B, base beta 1)", seq, 0);
    printf("sequence / base(beta 0) = %.3f; beta-1 cost %.1f us; x·A %.1f + t·B %.1f = %.1f us\n", seq / base0,
           base1 - base0, xa, tb, xa + tb);
    // cuBLASLt: row-major C[m×n] = A[m×k]·B[k×n] as column-major Cᵀ = Bᵀ·Aᵀ (n×m), bf16 in and out,
    // f32 compute, every heuristic result timed.
    cublasLtHandle_t lt;
    CB(cublasLtCreate(&lt));
    void* ws;
    const size_t ws_bytes = 64 << 20;
    CK(cudaMalloc(&ws, ws_bytes));
    auto lt_sweep = [&](const char* what, int mm, int nn, int kk, const bf* A, const bf* B, bf* C, float alpha,
                        double bytes) {
        cublasLtMatmulDesc_t desc;
        CB(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasLtMatrixLayout_t la, lb, lc;
        CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, nn, kk, nn));  // Bᵀ as column-major (nn × kk)
        CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, kk, mm, kk));  // Aᵀ as column-major (kk × mm)
        CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, nn, mm, nn));
        cublasLtMatmulPreference_t pref;
        CB(cublasLtMatmulPreferenceCreate(&pref));
        CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                sizeof ws_bytes));
        cublasLtMatmulHeuristicResult_t res[16];
        int found = 0;
        CB(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 16, res, &found));
        const float beta = 0.f;
        for (int i = 0; i < found; i++) {
            const float us = time_us([&] {
                CB(cublasLtMatmul(lt, desc, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &res[i].algo, ws, ws_bytes, 0));
            });
            char name[96];
            snprintf(name, sizeof name, "%s: cuBLASLt heuristic %d", what, i);
            report(name, us, bytes);
        }
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(desc);
    };
    lt_sweep("t = s·x·A", m, r, in, x, a, t, 2.f, (double)m * in * 2);
    lt_sweep("y = t·B", m, out, r, t, b, y, 1.f, ybytes);
    printf("done\n");
    return 0;
}
