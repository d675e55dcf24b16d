// LoRA linear lab, the tensor-core kernels of kernels/lora_tc.cu (included from the library, so
// the lab runs the shipped code): first checked against a CPU reference (f64 sums of the bf16
// inputs) on odd shapes, then timed at bf16 8×2048×4096 (m 16384, in = out = 4096, r = 16)
// against the cuBLAS calls they replace, and the whole backward and forward sequences
// interleaved (alternating batches, so that the GEMM's clock drift hits both alike). Earlier
// states of this file (commit 303144a) also timed the variants that were not kept.
//
//   nvcc -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Icrates/metal-candle/src/ops/cuda/kernels \
//        bench/kernel-lab/tclab.cu -lcublas -o tclab && ./tclab
// (on the GPU machine, libcublas.so.13 from PyTorch's nvidia/cu13/lib on LD_LIBRARY_PATH).
#include "lora_tc.cu"
#include "dy_bulk.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>
#include "lab.cuh"

static int sms = 132;
static const int RING = GRAD_STAGES * 8 * 5 * 32 * 16;  // the gradient kernels' dynamic shared memory

// The bulk-copy variant (lora_dy_grads_bulk_bf16 has BULK_STAGES stages); the lab's own
// instances with other stage counts; `per_sm`: blocks per SM the grid is sized for (as the
// library's chunks_for, which takes two; three stages leave room for three).
template <int S, bool LANES = true, bool STAGGER = false, bool MATH = true>
__global__ void __launch_bounds__(256) dy_grads_bulk_s(const bf* D, const bf* L, const bf* B, long long sb0, long long sb1,
                                                       float* Gp, float* Pp, int m, int n, int r, int rpc) {
    lora_dy_grads_bulk<bf, S, LANES, STAGGER, MATH>(D, L, B, sb0, sb1, Gp, Pp, m, n, r, rpc);
}
using DyGradsFn = void (*)(const bf*, const bf*, const bf*, long long, long long, float*, float*, int, int, int, int);
// `rpc`: rows per chunk in the timed shape where > 0 (528: chunks 4.125 MiB apart, not 4).
struct BulkVariant { DyGradsFn f; int stages, per_sm, rpc; const char* name; };
// (Earlier runs also timed rows_per_chunk 528 and 3 blocks per SM: no faster; the notes in
// bench/results/h200-2026-12-04-session11/lab/tclab-bulk.txt.)
static const BulkVariant bulk_variants[] = {{lora_dy_grads_bulk_bf16, BULK_STAGES, 2, 0, "bulk (lanes issue)"},
                                            {dy_grads_bulk_s<4, false>, 4, 2, 0, "bulk, thread 0 issues"},
                                            {dy_grads_bulk_s<4, true, true>, 4, 2, 0, "bulk, stagger"},
                                            {dy_grads_bulk_s<3, true, true>, 3, 2, 0, "bulk, 3 stages, stagger"},
                                            {dy_grads_bulk_s<3>, 3, 2, 0, "bulk, 3 stages"},
                                            {dy_grads_bulk_s<5>, 5, 2, 0, "bulk, 5 stages"},
                                            {dy_grads_bulk_s<4, true, false, false>, 4, 2, 0, "bulk, no products (diag.)"}};

// --- launches, as the library makes them -----------------------------------------------------
// Row tiles per warp of lora_outer as the library picks them: enough warps for 32 per SM, at
// most 8 tiles.
static int outer_tiles(int m, int n) {
    const int warp_tiles = (n + 63) / 64 * ((m + 15) / 16);
    return std::min(8, std::max(1, warp_tiles / (sms * 32)));
}
// y = alpha·L·Rᵀ (+ bias) (+ addend); L[row][j] at row·ld_l + j·l_col (l_col 1 without an addend).
static void outer_add(const bf* L, long long ld_l, long long l_col, const bf* R, long long rc, long long rk,
                      const bf* bias, const bf* addend, bf* y, int m, int n, int r, float alpha, cudaStream_t stream = 0) {
    const int warps = 4, tiles = outer_tiles(m, n);
    dim3 grid((n + 64 * warps - 1) / (64 * warps), (m + 16 * tiles - 1) / (16 * tiles));
    auto f = addend ? (r <= 16 ? lora_outer_add_k1_bf16 : lora_outer_add_k2_bf16)
                    : (r <= 16 ? lora_outer_k1_bf16 : lora_outer_k2_bf16);
    f<<<grid, 32 * warps, 0, stream>>>(L, ld_l, l_col, R, rc, rk, bias, addend, y, m, n, r, tiles, alpha);
}
static void outer(const bf* L, long long ld_l, const bf* R, long long rc, long long rk, const bf* bias, bf* y, int m,
                  int n, int r, float alpha, cudaStream_t stream = 0) {
    outer_add(L, ld_l, 1, R, rc, rk, bias, nullptr, y, m, n, r, alpha, stream);
}

// W' = W + scale·Bᵀ·Aᵀ (n, k), as the library: L[i][j] = B[j][i] read through B's strides.
static void merge_weight(const bf* w, const bf* b, const bf* a, bf* wm, int n, int k, int r, float scale) {
    outer_add(b, 1, n, a, r, 1, nullptr, w, wm, n, k, r, scale);
}

// The merge at other row-tile counts per warp than the library's rule gives. (Session 12 also
// timed a variant that loaded the next tile's addend ahead, and one held to 5 blocks per SM:
// no faster; bench/results/gpu-2026-12-06-session12/.)
__global__ void __launch_bounds__(128) merge_lab(const bf* L, long long ld_l, long long l_col, const bf* R, long long rc,
                                                 long long rk, const bf* addend, bf* y, int m, int n, int r, int tiles,
                                                 float alpha) {
    lora_outer<bf, 1, true>(L, ld_l, l_col, R, rc, rk, nullptr, addend, y, m, n, r, tiles, alpha);
}
// Rank ≤ 16 (one chunk of ranks).
static void merge_variant(int tiles, const bf* w, const bf* b, const bf* a, bf* wm, int n, int k, int r, float scale) {
    dim3 grid((k + 255) / 256, (n + 16 * tiles - 1) / (16 * tiles));
    merge_lab<<<grid, 128>>>(b, 1, n, a, r, 1, w, wm, n, k, r, tiles, scale);
}
// Session 11's merge: B transposed by a kernel of its own, then the per-tile addend loads.
__global__ void transpose(const bf* in, bf* out, int rows, int cols) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < rows * cols) out[(idx % cols) * rows + idx / cols] = in[idx];
}
static void merge_weight_s11(const bf* w, const bf* b, const bf* a, bf* bt, bf* wm, int n, int k, int r, float scale) {
    transpose<<<(r * n + 255) / 256, 256>>>(b, bt, r, n);
    const int tiles = outer_tiles(n, k);
    dim3 grid((k + 255) / 256, (n + 16 * tiles - 1) / (16 * tiles));
    merge_lab<<<grid, 128>>>(bt, r, 1, a, r, 1, w, wm, n, k, r, tiles, scale);
}

static int chunks_for(int m, int n, int* rows_per_chunk) {
    const int slabs = (n + 511) / 512;
    int chunks = std::max(1, (2 * sms + slabs - 1) / slabs);
    int rpc = ((m + chunks - 1) / chunks + 15) / 16 * 16;
    rpc = std::max(rpc, 16);
    *rows_per_chunk = rpc;
    return (m + rpc - 1) / rpc;
}

// G = dy·Bᵀ (m, 16) and dB = Tᵀ·dy (r, n) from one read of dy; T (m, 16).
static void dy_grads(const bf* dy, const bf* t, const bf* b, bf* g, bf* db, float* gp, float* pp, int m, int n,
                     int r, cudaStream_t stream = 0) {
    int rpc;
    const int chunks = chunks_for(m, n, &rpc), slabs = (n + 511) / 512;
    lora_dy_grads_bf16<<<dim3(slabs, chunks), 256, RING, stream>>>(dy, t, b, n, 1, gp, pp, m, n, r, rpc);
    const PartSum<bf> gs{gp, g, 16, 1, slabs, m, 16, m, 16, 1.f}, ds{pp, db, n, 1, chunks, 16, n, r, n, 1.f};
    const long long most = std::max<long long>((long long)m * 16, (long long)r * n);
    sum_two_parts_bf16<<<dim3((int)std::min<long long>((most + 255) / 256, 4 * sms), 2), 256, 0, stream>>>(gs, ds);
}

// chunks_for for `per_sm` blocks per SM.
static int bulk_chunks(int m, int n, int per_sm, int* rows_per_chunk) {
    const int slabs = (n + 511) / 512;
    const int chunks = std::max(1, (per_sm * sms + slabs - 1) / slabs);
    *rows_per_chunk = std::max(16, ((m + chunks - 1) / chunks + 15) / 16 * 16);
    return (m + *rows_per_chunk - 1) / *rows_per_chunk;
}
// The same with lora_dy_grads_bulk (or a variant of it); rows_per_chunk `rpc_force` where > 0.
static void dy_grads_bulk(const bf* dy, const bf* t, const bf* b, bf* g, bf* db, float* gp, float* pp, int m, int n,
                          int r, cudaStream_t stream = 0, const BulkVariant& v = bulk_variants[0], int rpc_force = 0) {
    int rpc;
    int chunks = bulk_chunks(m, n, v.per_sm, &rpc);
    const int slabs = (n + 511) / 512;
    if (rpc_force > 0) { rpc = rpc_force; chunks = (m + rpc - 1) / rpc; }
    v.f<<<dim3(slabs, chunks), 256, v.stages * BULK_STAGE_BYTES, stream>>>(dy, t, b, n, 1, gp, pp, m, n, r, rpc);
    const PartSum<bf> gs{gp, g, 16, 1, slabs, m, 16, m, 16, 1.f}, ds{pp, db, n, 1, chunks, 16, n, r, n, 1.f};
    const long long most = std::max<long long>((long long)m * 16, (long long)r * n);
    sum_two_parts_bf16<<<dim3((int)std::min<long long>((most + 255) / 256, 4 * sms), 2), 256, 0, stream>>>(gs, ds);
}

// --- data --------------------------------------------------------------------------------------

static bf* dev_random(size_t n, uint32_t seed, float scale) {
    bf* p;
    CK(cudaMalloc(&p, std::max<size_t>(n, 1) * 2));
    fill<<<256, 256>>>(p, n, seed, scale);
    return p;
}
static std::vector<float> to_host(const bf* p, size_t n) {
    std::vector<bf> h(n);
    CK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = __bfloat162float(h[i]);
    return f;
}

// Largest |got − want| relative to the largest |want| (bf16 outputs: ~4e-3 is a rounding).
static double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
    double e = 0, s = 1e-30;
    for (size_t i = 0; i < want.size(); i++) {
        e = std::max(e, std::fabs(got[i] - want[i]));
        s = std::max(s, std::fabs(want[i]));
    }
    return e / s;
}

static bool check_case(int m, int k, int n, int r, bool with_bias) {
    const float scale = 2.f;
    bf *x = dev_random((size_t)m * k, 1, 1.f), *dy = dev_random((size_t)m * n, 2, 1.f);
    bf *a = dev_random((size_t)k * r, 3, 0.5f), *b = dev_random((size_t)r * n, 4, 0.5f);
    // T and G in rows of 16 (ld), the ranks' columns first; T's columns past r hold noise, which
    // must not reach any output. Rank 24 (past the gradient kernels): ld 24.
    const int ld = r <= 16 ? 16 : r;
    bf *t = dev_random((size_t)m * ld, 5, 1.f), *bias = dev_random(n, 6, 1.f);
    bf *y, *g, *db, *da, *dx;
    CK(cudaMalloc(&y, (size_t)m * n * 2)); CK(cudaMalloc(&g, (size_t)m * ld * 2)); CK(cudaMalloc(&db, (size_t)r * n * 2));
    CK(cudaMalloc(&da, (size_t)k * r * 2)); CK(cudaMalloc(&dx, (size_t)m * k * 2));
    float *gp, *pp;
    CK(cudaMalloc(&gp, (size_t)((n + 511) / 512) * m * 16 * 4));
    CK(cudaMalloc(&pp, (size_t)(4 * sms + 8) * 16 * std::max(n, k) * 4));
    CK(cudaMemset(y, 0xff, (size_t)m * n * 2)); CK(cudaMemset(dx, 0xff, (size_t)m * k * 2));
    // y = scale·T·B + bias (R[col][j] = B[j][col]); dx = scale·G·Aᵀ with G the kernel's own.
    outer(t, ld, b, 1, n, with_bias ? bias : nullptr, y, m, n, r, scale);
    const bool grads = r <= 16;  // the gradient kernels' limit; past it, dx from G = T
    if (grads) {
        dy_grads(dy, t, b, g, db, gp, pp, m, n, r);
    } else {
        CK(cudaMemcpy(g, t, (size_t)m * ld * 2, cudaMemcpyDeviceToDevice));
    }
    outer(g, ld, a, r, 1, nullptr, dx, m, k, r, scale);
    // The merged weight W' = W + scale·Bᵀ·Aᵀ (n, k): L[i][j] = B[j][i], R[col][j] = A[col][j].
    bf *w = dev_random((size_t)n * k, 7, 1.f), *wm;
    CK(cudaMalloc(&wm, (size_t)n * k * 2));
    CK(cudaMemset(wm, 0xff, (size_t)n * k * 2));
    bf* bt;
    CK(cudaMalloc(&bt, (size_t)n * r * 2));
    merge_weight(w, b, a, wm, n, k, r, scale);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    const auto X = to_host(x, (size_t)m * k), DY = to_host(dy, (size_t)m * n), A = to_host(a, (size_t)k * r),
               B = to_host(b, (size_t)r * n), T = to_host(t, (size_t)m * ld), BI = to_host(bias, n),
               Y = to_host(y, (size_t)m * n), G = to_host(g, (size_t)m * ld), DB = to_host(db, (size_t)r * n), DX = to_host(dx, (size_t)m * k);
    std::vector<double> wy((size_t)m * n), wg((size_t)m * r), wdb((size_t)r * n, 0), wdx((size_t)m * k);
    for (int i = 0; i < m; i++)
        for (int c = 0; c < n; c++) {
            double s = 0;
            for (int j = 0; j < r; j++) s += (double)T[(size_t)i * ld + j] * B[(size_t)j * n + c];
            wy[(size_t)i * n + c] = scale * s + (with_bias ? BI[c] : 0.0);
        }
    std::vector<float> Gr((size_t)m * r);  // the kernel's G, its first r columns
    for (int i = 0; i < m; i++)
        for (int j = 0; j < r; j++) {
            double s = 0;
            for (int c = 0; c < n; c++) s += (double)DY[(size_t)i * n + c] * B[(size_t)j * n + c];
            wg[(size_t)i * r + j] = s;
            Gr[(size_t)i * r + j] = G[(size_t)i * ld + j];
        }
    for (int j = 0; j < r; j++)
        for (int c = 0; c < n; c++) {
            double s = 0;
            for (int i = 0; i < m; i++) s += (double)T[(size_t)i * ld + j] * DY[(size_t)i * n + c];
            wdb[(size_t)j * n + c] = s;
        }
    // dx from the kernel's G (bf16), as the library computes it.
    for (int i = 0; i < m; i++)
        for (int c = 0; c < k; c++) {
            double s = 0;
            for (int j = 0; j < r; j++) s += (double)G[(size_t)i * ld + j] * A[(size_t)c * r + j];
            wdx[(size_t)i * k + c] = scale * s;
        }
    const auto W = to_host(w, (size_t)n * k), WM = to_host(wm, (size_t)n * k);
    std::vector<double> wwm((size_t)n * k);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < k; c++) {
            double s = 0;
            for (int j = 0; j < r; j++) s += (double)B[(size_t)j * n + i] * A[(size_t)c * r + j];
            wwm[(size_t)i * k + c] = W[(size_t)i * k + c] + scale * s;
        }
    // lora_dy_grads_bulk's G and dB, with the library's chunks and with chunks of 11 steps (the
    // ring wraps); then the variant with staggered walks, both ways.
    double eb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (grads) {
        bf *g2, *db2;
        CK(cudaMalloc(&g2, (size_t)m * 16 * 2)); CK(cudaMalloc(&db2, (size_t)r * n * 2));
        for (int v = 0; v < 4; v++) {
            CK(cudaMemset(g2, 0xff, (size_t)m * 16 * 2)); CK(cudaMemset(db2, 0xff, (size_t)r * n * 2));
            dy_grads_bulk(dy, t, b, g2, db2, gp, pp, m, n, r, 0, bulk_variants[v < 2 ? 0 : 2], v & 1 ? 176 : 0);
            CK(cudaDeviceSynchronize());
            CK(cudaGetLastError());
            const auto G2 = to_host(g2, (size_t)m * 16), DB2 = to_host(db2, (size_t)r * n);
            std::vector<float> G2r((size_t)m * r);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < r; j++) G2r[(size_t)i * r + j] = G2[(size_t)i * 16 + j];
            eb[2 * v] = rel_err(G2r, wg);
            eb[2 * v + 1] = rel_err(DB2, wdb);
        }
        CK(cudaFree(g2)); CK(cudaFree(db2));
    }
    // The merge with 3 row tiles per warp (tiles that run past n's rows), and session 11's.
    // Both take one chunk of ranks (r ≤ 16).
    double emv = 0;
    for (int variant = 0; variant < 2 && r <= 16; variant++) {
        CK(cudaMemset(wm, 0xff, (size_t)n * k * 2));
        if (variant == 0) merge_variant(3, w, b, a, wm, n, k, r, scale);
        else merge_weight_s11(w, b, a, bt, wm, n, k, r, scale);
        CK(cudaDeviceSynchronize());
        emv = std::max(emv, rel_err(to_host(wm, (size_t)n * k), wwm));
    }
    const double e[13] = {rel_err(Y, wy), grads ? rel_err(Gr, wg) : 0.0, grads ? rel_err(DB, wdb) : 0.0,
                          rel_err(DX, wdx), std::max(rel_err(WM, wwm), emv), eb[0], eb[1], eb[2], eb[3], eb[4], eb[5], eb[6], eb[7]};
    const bool ok = *std::max_element(e, e + 13) < 1e-2;
    printf("check m %5d k %4d n %4d r %2d bias %d: y %.1e G %.1e dB %.1e dx %.1e W' %.1e | bulk G %.1e dB %.1e, "
           "rpc 176 G %.1e dB %.1e; stagger G %.1e dB %.1e, rpc 176 G %.1e dB %.1e  %s\n",
           m, k, n, r, with_bias, e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9], e[10], e[11], e[12],
           ok ? "ok" : "FAIL");
    for (void* p : {(void*)x, (void*)dy, (void*)a, (void*)b, (void*)t, (void*)bias, (void*)y, (void*)g, (void*)db,
                    (void*)da, (void*)dx, (void*)gp, (void*)pp, (void*)w, (void*)wm, (void*)bt})
        CK(cudaFree(p));
    return ok;
}

// --- timing ------------------------------------------------------------------------------------
static cudaEvent_t ev0, ev1;
static float batch_us(const std::function<void()>& f, int per_batch) {
    CK(cudaEventRecord(ev0));
    for (int i = 0; i < per_batch; i++) f();
    CK(cudaEventRecord(ev1));
    CK(cudaEventSynchronize(ev1));
    float ms;
    CK(cudaEventElapsedTime(&ms, ev0, ev1));
    return ms * 1000.f / per_batch;
}
static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}
static float time_us(const std::function<void()>& f, int per_batch = 10, int batches = 21) {
    for (int i = 0; i < 3; i++) f();
    std::vector<float> t;
    for (int i = 0; i < batches; i++) t.push_back(batch_us(f, per_batch));
    CK(cudaGetLastError());
    return median(t);
}
// Alternating batches of f and g; medians of each and of the per-pair ratios f/g.
static void interleaved(const char* what, const std::function<void()>& f, const std::function<void()>& g,
                        const char* fname, const char* gname) {
    for (int i = 0; i < 3; i++) { f(); g(); }
    std::vector<float> tf, tg, ratio;
    for (int i = 0; i < 15; i++) {
        const float a = batch_us(f, 5), b = batch_us(g, 5);
        tf.push_back(a); tg.push_back(b); ratio.push_back(a / b);
    }
    printf("%-34s %s %8.1f us, %s %8.1f us, ratio %.3f\n", what, fname, median(tf), gname, median(tg), median(ratio));
}

static void gemm(cublasHandle_t h, int m, int n, int k, const bf* a, bool ta, int lda, const bf* b, bool tb, int ldb,
                 bf* c, int ldc, float alpha, float beta) {
    CB(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, CUDA_R_16BF,
                    ldb, a, CUDA_R_16BF, lda, &beta, c, CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#ifndef TCLAB_NO_MAIN  // overlaplab.cu reuses the helpers above
int main(int argc, char** argv) {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    sms = prop.multiProcessorCount;
    printf("%s, %d SMs\n", prop.name, sms);
    CK(cudaEventCreate(&ev0));
    CK(cudaEventCreate(&ev1));
    CK(cudaFuncSetAttribute(lora_dy_grads_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, RING));
    for (auto& v : bulk_variants)
        CK(cudaFuncSetAttribute(v.f, cudaFuncAttributeMaxDynamicSharedMemorySize, v.stages * BULK_STAGE_BYTES));

    bool ok = true;
    const int cases[][5] = {{1, 8, 8, 8, 0},      {37, 72, 40, 8, 1},    {129, 520, 1000, 16, 1}, {200, 64, 1544, 5, 0},
                            {16, 4096, 512, 16, 0}, {1000, 264, 136, 13, 1}, {300, 200, 96, 24, 0},
                            {4999, 64, 1032, 16, 0}, {2048, 32, 4096, 16, 1}};
    for (auto& cs : cases) ok &= check_case(cs[0], cs[1], cs[2], cs[3], cs[4]);
    if (argc > 1 && std::string(argv[1]) == "check") return ok ? 0 : 1;

    // `merge`: the checks, then only the pieces and sequences of the backward through W'.
    const bool quick = argc > 1 && std::string(argv[1]) == "merge";
    const int m = 16384, in = 4096, out = 4096, r = 16;
    const float scale = 2.f;
    cublasHandle_t h;
    CB(cublasCreate(&h));
    bf *x = dev_random((size_t)m * in, 1, 1.f), *w = dev_random((size_t)out * in, 2, 0.02f);
    bf *a = dev_random((size_t)in * r, 3, 0.02f), *b = dev_random((size_t)r * out, 4, 0.02f);
    bf *dy = dev_random((size_t)m * out, 5, 1.f), *t = dev_random((size_t)m * 16, 6, 1.f);
    bf *y, *g, *db, *da, *dx, *y2;
    CK(cudaMalloc(&y, (size_t)m * out * 2)); CK(cudaMalloc(&y2, (size_t)m * out * 2));
    CK(cudaMalloc(&dx, (size_t)m * in * 2)); CK(cudaMalloc(&g, (size_t)m * 16 * 2));
    CK(cudaMalloc(&db, (size_t)r * out * 2)); CK(cudaMalloc(&da, (size_t)in * r * 2));
    float *gp, *pp;
    CK(cudaMalloc(&gp, (size_t)8 * m * 16 * 4));
    CK(cudaMalloc(&pp, (size_t)(4 * sms + 8) * 16 * 4096 * 4));
    const double mb = (double)m * out * 2;
    auto report = [](const char* name, float us, double bytes) {
        printf("%-44s %9.1f us  %7.0f GB/s\n", name, us, bytes / (us * 1e-6) / 1e9);
    };
    report("copy of dy (read + write)", time_us([&] { CK(cudaMemcpyAsync(y2, dy, mb, cudaMemcpyDeviceToDevice)); }),
           2 * mb);
    report("write (memset)", time_us([&] { CK(cudaMemsetAsync(y2, 0, mb)); }), mb);
    // Forward's thin product y = s·T·B.
    report("cuBLAS y = s·T·B", time_us([&] { gemm(h, m, out, r, t, false, r, b, false, out, y, out, scale, 0.f); }), mb);
    report("outer  y = s·T·B", time_us([&] { outer(t, 16, b, 1, out, nullptr, y, m, out, r, scale); }), mb);
    for (int tiles : {2, 4, 5, 6, 8, 10, 12, 16}) {  // the library takes 8 here
        const std::string name = "outer  y = s·T·B, tiles " + std::to_string(tiles);
        dim3 grid((out + 255) / 256, (m + 16 * tiles - 1) / (16 * tiles));
        report(name.c_str(), time_us([&] {
                   lora_outer_k1_bf16<<<grid, 128>>>(t, 16, 1, b, 1, out, nullptr, nullptr, y, m, out, r, tiles, scale);
               }),
               mb);
    }

    // Backward's pieces.
    report("cuBLAS G = dy·Bᵀ", time_us([&] { gemm(h, m, r, out, dy, false, out, b, true, out, g, r, 1.f, 0.f); }), mb);
    report("cuBLAS dB = Tᵀ·dy", time_us([&] { gemm(h, r, out, m, t, true, r, dy, false, out, db, out, 1.f, 0.f); }), mb);
    report("fused G + dB (+ sums)", time_us([&] { dy_grads(dy, t, b, g, db, gp, pp, m, out, r); }), mb);
    if (!quick) {
        int rpc;
        const int chunks = chunks_for(m, out, &rpc);
        report("  its one pass over dy", time_us([&] {
                   lora_dy_grads_bf16<<<dim3(8, chunks), 256, RING>>>(dy, t, b, out, 1, gp, pp, m, out, r, rpc);
               }),
               mb);
        // The bulk-copy pass: first its outputs against lora_dy_grads' (the same sums in the same
        // order: bit for bit), then its times.
        bf *g1, *db1;
        CK(cudaMalloc(&g1, (size_t)m * 16 * 2)); CK(cudaMalloc(&db1, (size_t)r * out * 2));
        dy_grads(dy, t, b, g1, db1, gp, pp, m, out, r);
        CK(cudaDeviceSynchronize());
        const auto G1 = to_host(g1, (size_t)m * 16), DB1 = to_host(db1, (size_t)r * out);
        for (auto& v : bulk_variants) {
            if (std::string(v.name).find("diag") != std::string::npos) continue;  // not a correct kernel
            CK(cudaMemset(g, 0xff, (size_t)m * 16 * 2)); CK(cudaMemset(db, 0xff, (size_t)r * out * 2));
            dy_grads_bulk(dy, t, b, g, db, gp, pp, m, out, r, 0, v, v.rpc);
            CK(cudaDeviceSynchronize());
            CK(cudaGetLastError());
            const auto G2 = to_host(g, (size_t)m * 16), DB2 = to_host(db, (size_t)r * out);
            size_t diff = 0;
            double e = 0, s1 = 1e-30, e2 = 0, s2 = 1e-30;
            for (size_t i = 0; i < G1.size(); i++) {
                diff += G1[i] != G2[i];
                e = std::max(e, (double)std::fabs(G1[i] - G2[i])); s1 = std::max(s1, (double)std::fabs(G1[i]));
            }
            for (size_t i = 0; i < DB1.size(); i++) {
                diff += DB1[i] != DB2[i];
                e2 = std::max(e2, (double)std::fabs(DB1[i] - DB2[i])); s2 = std::max(s2, (double)std::fabs(DB1[i]));
            }
            printf("%-44s %zu of %zu values differ from lora_dy_grads' (G %.1e, dB %.1e)\n", v.name, diff,
                   G1.size() + DB1.size(), e / s1, e2 / s2);
            ok &= e / s1 < 1e-2 && e2 / s2 < 1e-2;
        }
        CK(cudaFree(g1)); CK(cudaFree(db1));
        for (auto& v : bulk_variants) {
            int vrpc;
            int vchunks = bulk_chunks(m, out, v.per_sm, &vrpc);
            if (v.rpc > 0) { vrpc = v.rpc; vchunks = (m + vrpc - 1) / vrpc; }
            const std::string s1 = std::string("fused G + dB (+ sums), ") + v.name, s2 = std::string("  its one pass, ") + v.name;
            report(s1.c_str(), time_us([&] { dy_grads_bulk(dy, t, b, g, db, gp, pp, m, out, r, 0, v, v.rpc); }), mb);
            report(s2.c_str(), time_us([&] {
                       v.f<<<dim3(8, vchunks), 256, v.stages * BULK_STAGE_BYTES>>>(dy, t, b, out, 1, gp, pp, m, out, r, vrpc);
                   }),
                   mb);
        }
        report("  its one pass over dy, rpc 528", time_us([&] {
                   lora_dy_grads_bf16<<<dim3(8, (m + 527) / 528), 256, RING>>>(dy, t, b, out, 1, gp, pp, m, out, r, 528);
               }),
               mb);
        // The two passes alternating, pair by pair.
        interleaved("pass: cp.async / bulk", [&] {
            lora_dy_grads_bf16<<<dim3(8, chunks), 256, RING>>>(dy, t, b, out, 1, gp, pp, m, out, r, rpc);
        }, [&] {
            lora_dy_grads_bulk_bf16<<<dim3(8, chunks), 256, BULK_STAGES * BULK_STAGE_BYTES>>>(dy, t, b, out, 1, gp, pp, m,
                                                                                                out, r, rpc);
        }, "cpasync", "bulk");
    }
    report("cuBLAS dA = s·xᵀ·G", time_us([&] { gemm(h, in, r, m, x, true, in, g, false, r, da, r, scale, 0.f); }), mb);
    report("cuBLAS dx = s·G·Aᵀ", time_us([&] { gemm(h, m, in, r, g, false, r, a, true, r, dx, in, scale, 0.f); }), mb);
    report("outer  dx = s·G·Aᵀ", time_us([&] { outer(g, 16, a, r, 1, nullptr, dx, m, in, r, scale); }), mb);
    auto dx_gemm0 = [&] { gemm(h, m, in, out, dy, false, out, w, false, in, dx, in, 1.f, 0.f); };
    // The merged weight W' = W + scale·Bᵀ·Aᵀ (out, in): dx = dy·W' is then the whole dx.
    bf *wm, *bt;
    CK(cudaMalloc(&wm, (size_t)out * in * 2));
    CK(cudaMalloc(&bt, (size_t)out * r * 2));
    auto merge = [&] { merge_weight(w, b, a, wm, out, in, r, scale); };
    auto merge_s11 = [&] { merge_weight_s11(w, b, a, bt, wm, out, in, r, scale); };
    report("merge  W' = W + s·Bᵀ·Aᵀ", time_us(merge), 2.0 * out * in * 2);
    report("merge, session 11 (transpose, tile loads)", time_us(merge_s11), 2.0 * out * in * 2);
    for (int tiles : {1, 2, 3, 4, 6, 8, 12, 16, 32}) {
        const std::string name = "merge, tiles " + std::to_string(tiles);
        report(name.c_str(), time_us([&] { merge_variant(tiles, w, b, a, wm, out, in, r, scale); }), 2.0 * out * in * 2);
    }
    auto bwd_merged = [&] {  // G + dB in one pass, cuBLAS dA, then dx = dy·W'
        dy_grads(dy, t, b, g, db, gp, pp, m, out, r);
        gemm(h, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        merge();
        gemm(h, m, in, out, dy, false, out, wm, false, in, dx, in, 1.f, 0.f);
    };
    auto bwd_merged_s11 = [&] {  // bwd_merged as session 11 shipped it
        dy_grads(dy, t, b, g, db, gp, pp, m, out, r);
        gemm(h, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        merge_s11();
        gemm(h, m, in, out, dy, false, out, wm, false, in, dx, in, 1.f, 0.f);
    };
    auto bwd_merged_bulk = [&] {  // bwd_merged with lora_dy_grads_bulk
        dy_grads_bulk(dy, t, b, g, db, gp, pp, m, out, r);
        gemm(h, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        merge();
        gemm(h, m, in, out, dy, false, out, wm, false, in, dx, in, 1.f, 0.f);
    };
    auto dx_gemm1 = [&] { gemm(h, m, in, out, dy, false, out, w, false, in, dx, in, 1.f, 1.f); };
    auto bwd_cublas = [&] {
        gemm(h, m, r, out, dy, false, out, b, true, out, g, r, 1.f, 0.f);
        gemm(h, r, out, m, t, true, r, dy, false, out, db, out, 1.f, 0.f);
        gemm(h, in, r, m, x, true, in, g, false, r, da, r, scale, 0.f);
        gemm(h, m, in, r, g, false, r, a, true, r, dx, in, scale, 0.f);
        dx_gemm1();
    };
    auto bwd_tc = [&] {  // as the library: tensor-core G + dB and dx, cuBLAS dA
        dy_grads(dy, t, b, g, db, gp, pp, m, out, r);
        gemm(h, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        outer(g, 16, a, r, 1, nullptr, dx, m, in, r, scale);
        dx_gemm1();
    };
    {  // How far dx through W' (rounded to bf16 once merged) is from dx through W and G·Aᵀ.
        bf* dx_tc;
        CK(cudaMalloc(&dx_tc, (size_t)m * in * 2));
        bwd_tc();
        CK(cudaMemcpy(dx_tc, dx, (size_t)m * in * 2, cudaMemcpyDeviceToDevice));
        bwd_merged();
        CK(cudaDeviceSynchronize());
        const auto p = to_host(dx, (size_t)m * in), q = to_host(dx_tc, (size_t)m * in);
        double d2 = 0, q2 = 0, dmax = 0, qmax = 0;
        for (size_t i = 0; i < p.size(); i++) {
            const double d = (double)p[i] - q[i];
            d2 += d * d; q2 += (double)q[i] * q[i];
            dmax = std::max(dmax, std::fabs(d)); qmax = std::max(qmax, (double)std::fabs(q[i]));
        }
        printf("dx through W' vs through W + G·Aᵀ: relative L2 %.2e, max %.2e (of the largest |dx|)\n",
               std::sqrt(d2 / q2), dmax / qmax);
        CK(cudaFree(dx_tc));
    }
    if (quick) {
        for (int round = 0; round < 2; round++) {
            interleaved("backward, merged W' / dX GEMM", bwd_merged, dx_gemm0, "seq", "gemm");
            interleaved("backward, session 11 / dX GEMM", bwd_merged_s11, dx_gemm0, "seq", "gemm");
            interleaved("backward, merged W' / session 11", bwd_merged, bwd_merged_s11, "new", "s11");
        }
        printf("checks %s\n", ok ? "passed" : "FAILED");
        return ok ? 0 : 1;
    }
    interleaved("dX GEMM beta 1 vs beta 0", dx_gemm1, dx_gemm0, "beta1", "beta0");
    interleaved("backward, cuBLAS pieces / dX GEMM", bwd_cublas, dx_gemm0, "seq", "gemm");
    interleaved("backward, tensor-core / dX GEMM", bwd_tc, dx_gemm0, "seq", "gemm");
    interleaved("backward, merged W' / dX GEMM", bwd_merged, dx_gemm0, "seq", "gemm");
    interleaved("backward, merged W' bulk / dX GEMM", bwd_merged_bulk, dx_gemm0, "seq", "gemm");
    auto base0 = [&] { gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 0.f); };
    auto fwd_cublas = [&] {
        gemm(h, m, r, in, x, false, in, a, false, r, t, r, scale, 0.f);
        gemm(h, m, out, r, t, false, r, b, false, out, y, out, 1.f, 0.f);
        gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 1.f);
    };
    auto fwd_tc = [&] {
        gemm(h, m, r, in, x, false, in, a, false, r, t, 16, scale, 0.f);
        outer(t, 16, b, 1, out, nullptr, y, m, out, r, 1.f);
        gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 1.f);
    };
    interleaved("forward, cuBLAS pieces / base GEMM", fwd_cublas, base0, "seq", "gemm");
    interleaved("forward, outer kernel / base GEMM", fwd_tc, base0, "seq", "gemm");
    interleaved("backward, cuBLAS pieces / dX GEMM", bwd_cublas, dx_gemm0, "seq", "gemm");
    interleaved("backward, tensor-core / dX GEMM", bwd_tc, dx_gemm0, "seq", "gemm");
    interleaved("backward, merged W' / dX GEMM", bwd_merged, dx_gemm0, "seq", "gemm");
    interleaved("backward, merged W' bulk / dX GEMM", bwd_merged_bulk, dx_gemm0, "seq", "gemm");
    interleaved("forward, outer kernel / base GEMM", fwd_tc, base0, "seq", "gemm");
    printf("checks %s\n", ok ? "passed" : "FAILED");
    return ok ? 0 : 1;
}
#endif
