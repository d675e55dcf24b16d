// LoRA linear lab: the memory-bound LoRA passes run beside the compute-bound GEMM on a second
// stream. The sequence as the library runs it (tensor-core kernels, one stream) against the same
// work cut into row chunks: the side stream computes a chunk's LoRA term (backward: G and dB from
// one pass over dy, then G·Aᵀ into dx; forward: T = x·A, then T·B into y), and the main stream's
// GEMM for that chunk accumulates onto it (beta = 1) as soon as it is ready, so that every
// chunk's LoRA work but the first overlaps a GEMM. Optionally cuBLAS is told to plan its GEMMs for
// fewer SMs (cublasSetSmCountTarget), leaving SMs free for the side stream, and the side stream
// gets the higher priority. Shapes: bf16, m 16384, in = out = 4096, r = 16.
//
//   nvcc -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Icrates/metal-candle/src/ops/cuda/kernels \
//        bench/kernel-lab/overlaplab.cu -lcublas -o overlaplab && ./overlaplab
#define TCLAB_NO_MAIN
#include "tclab.cu"

#include "two_streams.cuh"

static cudaEvent_t chunk_ev[64];

static double max_rel_diff(const bf* p, const bf* q, size_t n) {
    const auto a = to_host(p, n), b = to_host(q, n);
    double e = 0, s = 1e-30;
    for (size_t i = 0; i < n; i++) {
        e = std::max(e, (double)std::fabs(a[i] - b[i]));
        s = std::max(s, (double)std::fabs(b[i]));
    }
    return e / s;
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    sms = prop.multiProcessorCount;
    printf("%s, %d SMs\n", prop.name, sms);
    create_streams();
    for (auto& ev : chunk_ev) CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CK(cudaFuncSetAttribute(lora_dy_grads_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, RING));

    const int m = 16384, in = 4096, out = 4096, r = 16, max_chunks = 16;
    const float scale = 2.f;
    cublasHandle_t h, h2;
    CB(cublasCreate(&h));
    CB(cublasCreate(&h2));
    CB(cublasSetStream(h, ms));
    bf *x = dev_random((size_t)m * in, 1, 1.f), *w = dev_random((size_t)out * in, 2, 0.02f);
    bf *a = dev_random((size_t)in * r, 3, 0.02f), *b = dev_random((size_t)r * out, 4, 0.02f);
    bf *dy = dev_random((size_t)m * out, 5, 1.f);
    bf *y, *y_ref, *t, *g, *db, *da, *dx, *dx_ref;
    CK(cudaMalloc(&y, (size_t)m * out * 2)); CK(cudaMalloc(&y_ref, (size_t)m * out * 2));
    CK(cudaMalloc(&dx, (size_t)m * in * 2)); CK(cudaMalloc(&dx_ref, (size_t)m * in * 2));
    CK(cudaMalloc(&t, (size_t)m * 16 * 2)); CK(cudaMemset(t, 0, (size_t)m * 16 * 2));
    CK(cudaMalloc(&g, (size_t)m * 16 * 2));
    CK(cudaMalloc(&db, (size_t)max_chunks * r * out * 2)); CK(cudaMalloc(&da, (size_t)in * r * 2));
    float *gp, *pp;
    CK(cudaMalloc(&gp, (size_t)8 * m * 16 * 4));
    CK(cudaMalloc(&pp, (size_t)(4 * sms + 8) * 16 * 4096 * 4));
    CK(cudaDeviceSynchronize());

    // The GEMMs the ratios are taken against, and the sequences as the library runs them.
    auto dx_gemm0 = [&] { gemm(h, m, in, out, dy, false, out, w, false, in, dx, in, 1.f, 0.f); };
    auto base0 = [&] { gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 0.f); };
    auto bwd_seq = [&] {
        CB(cublasSetStream(h2, ms));
        dy_grads(dy, t, b, g, db, gp, pp, m, out, r, ms);
        gemm(h2, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        outer(g, 16, a, r, 1, nullptr, dx, m, in, r, scale, ms);
        gemm(h, m, in, out, dy, false, out, w, false, in, dx, in, 1.f, 1.f);
    };
    auto fwd_seq = [&] {
        CB(cublasSetStream(h2, ms));
        gemm(h2, m, r, in, x, false, in, a, false, r, t, 16, scale, 0.f);
        outer(t, 16, b, 1, out, nullptr, y, m, out, r, 1.f, ms);
        gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 1.f);
    };
    // Chunked, two streams. `target` > 0: cuBLAS plans the main stream's GEMMs for that many SMs.
    auto bwd_overlap = [&](int chunks, cudaStream_t ss, int target) {
        const int mc = m / chunks;
        CB(cublasSetStream(h2, ss));
        CK(cudaEventRecord(fork_ev, ms));
        CK(cudaStreamWaitEvent(ss, fork_ev));
        for (int c = 0; c < chunks; c++) {
            const size_t row = (size_t)c * mc;
            dy_grads(dy + row * out, t + row * 16, b, g + row * 16, db + (size_t)c * r * out, gp, pp, mc, out, r, ss);
            outer(g + row * 16, 16, a, r, 1, nullptr, dx + row * in, mc, in, r, scale, ss);
            CK(cudaEventRecord(chunk_ev[c], ss));
        }
        gemm(h2, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        CK(cudaEventRecord(join_ev, ss));
        CB(cublasSetSmCountTarget(h, target));
        for (int c = 0; c < chunks; c++) {
            const size_t row = (size_t)c * mc;
            CK(cudaStreamWaitEvent(ms, chunk_ev[c]));
            gemm(h, mc, in, out, dy + row * out, false, out, w, false, in, dx + row * in, in, 1.f, 1.f);
        }
        CB(cublasSetSmCountTarget(h, 0));
        CK(cudaStreamWaitEvent(ms, join_ev));
    };
    auto fwd_overlap = [&](int chunks, cudaStream_t ss, int target) {
        const int mc = m / chunks;
        CB(cublasSetStream(h2, ss));
        CK(cudaEventRecord(fork_ev, ms));
        CK(cudaStreamWaitEvent(ss, fork_ev));
        for (int c = 0; c < chunks; c++) {
            const size_t row = (size_t)c * mc;
            gemm(h2, mc, r, in, x + row * in, false, in, a, false, r, t + row * 16, 16, scale, 0.f);
            outer(t + row * 16, 16, b, 1, out, nullptr, y + row * out, mc, out, r, 1.f, ss);
            CK(cudaEventRecord(chunk_ev[c], ss));
        }
        CK(cudaEventRecord(join_ev, ss));
        CB(cublasSetSmCountTarget(h, target));
        for (int c = 0; c < chunks; c++) {
            const size_t row = (size_t)c * mc;
            CK(cudaStreamWaitEvent(ms, chunk_ev[c]));
            gemm(h, mc, out, in, x + row * in, false, in, w, true, in, y + row * out, out, 1.f, 1.f);
        }
        CB(cublasSetSmCountTarget(h, 0));
        CK(cudaStreamWaitEvent(ms, join_ev));
    };

    // Same results: the overlapped sequences against the sequential ones (chunked GEMMs may
    // pick other algorithms, so equal up to rounding).
    bool ok = true;
    bwd_seq();
    CK(cudaMemcpyAsync(dx_ref, dx, (size_t)m * in * 2, cudaMemcpyDeviceToDevice, ms));
    fwd_seq();
    CK(cudaMemcpyAsync(y_ref, y, (size_t)m * out * 2, cudaMemcpyDeviceToDevice, ms));
    CK(cudaStreamSynchronize(ms));
    for (int chunks : {2, 4, 8}) {
        CK(cudaMemsetAsync(dx, 0xff, (size_t)m * in * 2, ms));
        CK(cudaMemsetAsync(y, 0xff, (size_t)m * out * 2, ms));
        bwd_overlap(chunks, side_hi, sms - 16);
        fwd_overlap(chunks, side_hi, sms - 16);
        CK(cudaStreamSynchronize(ms));
        const double ex = max_rel_diff(dx, dx_ref, (size_t)m * in), ey = max_rel_diff(y, y_ref, (size_t)m * out);
        const bool good = ex < 1e-2 && ey < 1e-2;
        ok &= good;
        printf("check %d chunks: dx %.1e, y %.1e vs one stream  %s\n", chunks, ex, ey, good ? "ok" : "FAIL");
    }

    ratio_vs("backward, one stream (as shipped)", bwd_seq, dx_gemm0);
    ratio_vs("forward, one stream (as shipped)", fwd_seq, base0);
    for (int chunks : {2, 4, 8}) {
        for (int free_sms : {0, 8, 16, 32}) {
            for (int prio : {0, 1}) {
                char name[96];
                cudaStream_t ss = prio ? side_hi : side_lo;
                const int target = free_sms ? sms - free_sms : 0;
                snprintf(name, sizeof name, "backward, %d chunks, %2d SMs left, side prio %s", chunks, free_sms,
                         prio ? "high" : "low");
                ratio_vs(name, [&] { bwd_overlap(chunks, ss, target); }, dx_gemm0);
                snprintf(name, sizeof name, "forward,  %d chunks, %2d SMs left, side prio %s", chunks, free_sms,
                         prio ? "high" : "low");
                ratio_vs(name, [&] { fwd_overlap(chunks, ss, target); }, base0);
            }
        }
    }
    ratio_vs("backward, one stream (as shipped)", bwd_seq, dx_gemm0);
    ratio_vs("forward, one stream (as shipped)", fwd_seq, base0);
    printf("checks %s\n", ok ? "passed" : "FAILED");
    return ok ? 0 : 1;
}
