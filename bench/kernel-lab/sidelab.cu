// LoRA linear backward lab: the memory-bound passes beside each other on two streams. The
// backward through the merged weight (as the library runs it, one stream) reads dy once for G
// and dB (`lora_dy_grads` and its sums), reads x for dA (cuBLAS), and reads W to write
// W' = W + scale·Bᵀ·Aᵀ (the merge) before the dX GEMM on W'. None of those three passes
// reaches the copy rate alone (65%, 89% and 71–78% of it on an H200), and the merge does not
// depend on the other two, so a second stream can run it while the first makes G, dB and dA:
// the two then share the memory's bandwidth instead of each leaving part of it idle. (Session
// 11's overlaplab put the passes beside the GEMM instead, which holds every SM; that did not
// pay.) Variants, each timed interleaved with the bare dX GEMM and with the one-stream
// sequence; results checked equal (bit for bit: same kernels, same order of sums). Also the
// forward with T = s·x·A beside the base GEMM and T·B added onto its output in place.
//
//   nvcc -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Icrates/metal-candle/src/ops/cuda/kernels \
//        -Ibench/kernel-lab bench/kernel-lab/sidelab.cu -lcublas -o sidelab && ./sidelab
#define TCLAB_NO_MAIN
#include "tclab.cu"

#include "two_streams.cuh"

static cudaEvent_t g_ready;

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    sms = prop.multiProcessorCount;
    printf("%s, %d SMs\n", prop.name, sms);
    create_streams();
    CK(cudaEventCreateWithFlags(&g_ready, cudaEventDisableTiming));
    CK(cudaFuncSetAttribute(lora_dy_grads_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize, RING));

    const int m = 16384, in = 4096, out = 4096, r = 16;
    const float scale = 2.f;
    cublasHandle_t h, h2;
    CB(cublasCreate(&h));
    CB(cublasCreate(&h2));
    CB(cublasSetStream(h, ms));
    bf *x = dev_random((size_t)m * in, 1, 1.f), *w = dev_random((size_t)out * in, 2, 0.02f);
    bf *a = dev_random((size_t)in * r, 3, 0.02f), *b = dev_random((size_t)r * out, 4, 0.02f);
    bf *dy = dev_random((size_t)m * out, 5, 1.f), *t = dev_random((size_t)m * 16, 6, 1.f);
    bf *g, *db, *da, *dx, *wm, *dx_ref, *y2;
    CK(cudaMalloc(&dx, (size_t)m * in * 2)); CK(cudaMalloc(&dx_ref, (size_t)m * in * 2));
    CK(cudaMalloc(&y2, (size_t)m * out * 2));
    CK(cudaMalloc(&g, (size_t)m * 16 * 2)); CK(cudaMalloc(&wm, (size_t)out * in * 2));
    CK(cudaMalloc(&db, (size_t)r * out * 2)); CK(cudaMalloc(&da, (size_t)in * r * 2));
    float *gp, *pp;
    CK(cudaMalloc(&gp, (size_t)8 * m * 16 * 4));
    CK(cudaMalloc(&pp, (size_t)(4 * sms + 8) * 16 * 4096 * 4));
    CK(cudaDeviceSynchronize());

    auto merge_on = [&](cudaStream_t st) { outer_add(b, 1, out, a, r, 1, nullptr, w, wm, out, in, r, scale, st); };
    auto grads_on = [&](cudaStream_t st, cublasHandle_t hh) {
        dy_grads(dy, t, b, g, db, gp, pp, m, out, r, st);
        CB(cublasSetStream(hh, st));
        gemm(hh, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
    };
    auto dx_gemm0 = [&] { gemm(h, m, in, out, dy, false, out, w, false, in, dx, in, 1.f, 0.f); };
    auto dx_gemm_w = [&] { gemm(h, m, in, out, dy, false, out, wm, false, in, dx, in, 1.f, 0.f); };
    // As the library: one stream.
    auto bwd_seq = [&] {
        grads_on(ms, h);
        merge_on(ms);
        dx_gemm_w();
    };
    // The merge on the side stream beside G, dB and dA on the main one; the GEMM after both.
    auto bwd_merge_side = [&](cudaStream_t ss) {
        CK(cudaEventRecord(fork_ev, ms));
        CK(cudaStreamWaitEvent(ss, fork_ev));
        merge_on(ss);
        CK(cudaEventRecord(join_ev, ss));
        grads_on(ms, h);
        CK(cudaStreamWaitEvent(ms, join_ev));
        dx_gemm_w();
    };
    // G, dB and dA on the side stream beside the merge and then the GEMM on the main one: dA
    // may also fill the GEMM's last wave.
    auto bwd_grads_side = [&](cudaStream_t ss) {
        CK(cudaEventRecord(fork_ev, ms));
        CK(cudaStreamWaitEvent(ss, fork_ev));
        grads_on(ss, h2);
        CK(cudaEventRecord(join_ev, ss));
        merge_on(ms);
        dx_gemm_w();
        CK(cudaStreamWaitEvent(ms, join_ev));
    };
    // The merge beside the pass over dy only; dA beside the GEMM.
    auto bwd_da_late = [&](cudaStream_t ss) {
        CK(cudaEventRecord(fork_ev, ms));
        CK(cudaStreamWaitEvent(ss, fork_ev));
        merge_on(ss);
        CK(cudaEventRecord(join_ev, ss));
        dy_grads(dy, t, b, g, db, gp, pp, m, out, r, ms);
        CK(cudaEventRecord(g_ready, ms));
        CK(cudaStreamWaitEvent(ss, g_ready));
        CB(cublasSetStream(h2, ss));
        gemm(h2, in, r, m, x, true, in, g, false, 16, da, r, scale, 0.f);
        CK(cudaStreamWaitEvent(ms, join_ev));
        dx_gemm_w();
        CK(cudaEventRecord(join_ev, ss));
        CK(cudaStreamWaitEvent(ms, join_ev));
    };

    // The forward, y = x·Wᵀ + s·(x·A)·B. As the library: T = s·x·A (cuBLAS), y = T·B (the
    // outer kernel), then the base GEMM adding onto y (beta = 1).
    bf *y, *y_ref, *tt;
    CK(cudaMalloc(&y, (size_t)m * out * 2)); CK(cudaMalloc(&y_ref, (size_t)m * out * 2));
    CK(cudaMalloc(&tt, (size_t)m * 16 * 2)); CK(cudaMemset(tt, 0, (size_t)m * 16 * 2));
    CK(cudaDeviceSynchronize());
    auto base0 = [&] { gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 0.f); };
    auto fwd_seq = [&] {
        gemm(h, m, r, in, x, false, in, a, false, r, tt, 16, scale, 0.f);
        outer(tt, 16, b, 1, out, nullptr, y, m, out, r, 1.f, ms);
        gemm(h, m, out, in, x, false, in, w, true, in, y, out, 1.f, 1.f);
    };
    // T on the side stream beside the base GEMM (beta = 0), then T·B added onto y in place
    // (the outer kernel's addend variant reading y): T's read of x hides behind the GEMM, and
    // y is read and written once more instead of written once and read by the GEMM.
    auto fwd_side = [&](cudaStream_t ss) {
        CK(cudaEventRecord(fork_ev, ms));
        CK(cudaStreamWaitEvent(ss, fork_ev));
        CB(cublasSetStream(h2, ss));
        gemm(h2, m, r, in, x, false, in, a, false, r, tt, 16, scale, 0.f);
        CK(cudaEventRecord(join_ev, ss));
        base0();
        CK(cudaStreamWaitEvent(ms, join_ev));
        outer_add(tt, 16, 1, b, 1, out, nullptr, y, y, m, out, r, 1.f, ms);
    };

    // Same results as one stream, bit for bit (the same kernels and cuBLAS calls).
    bool ok = true;
    bwd_seq();
    CK(cudaMemcpyAsync(dx_ref, dx, (size_t)m * in * 2, cudaMemcpyDeviceToDevice, ms));
    CK(cudaStreamSynchronize(ms));
    const auto da_ref = to_host(da, (size_t)in * r), db_ref = to_host(db, (size_t)r * out);
    const std::function<void()> variants[] = {[&] { bwd_merge_side(side_hi); }, [&] { bwd_grads_side(side_hi); },
                                              [&] { bwd_da_late(side_hi); }};
    for (auto& v : variants) {
        CK(cudaMemsetAsync(dx, 0xff, (size_t)m * in * 2, ms));
        CK(cudaMemsetAsync(da, 0xff, (size_t)in * r * 2, ms));
        CK(cudaMemsetAsync(db, 0xff, (size_t)r * out * 2, ms));
        CK(cudaMemsetAsync(wm, 0xff, (size_t)out * in * 2, ms));
        CK(cudaStreamSynchronize(ms));
        v();
        CK(cudaStreamSynchronize(ms));
        CK(cudaDeviceSynchronize());
        const auto p = to_host(dx, (size_t)m * in), q = to_host(dx_ref, (size_t)m * in);
        const auto pa = to_host(da, (size_t)in * r), pb = to_host(db, (size_t)r * out);
        size_t diff = 0;
        for (size_t i = 0; i < p.size(); i++) diff += !(p[i] == q[i]);
        for (size_t i = 0; i < pa.size(); i++) diff += !(pa[i] == da_ref[i]);
        for (size_t i = 0; i < pb.size(); i++) diff += !(pb[i] == db_ref[i]);
        printf("check: %zu values differ from one stream's  %s\n", diff, diff ? "FAIL" : "ok");
        ok &= diff == 0;
    }

    {  // The forward through the side stream against the shipped order (rounded differently:
       // T·B is added to the rounded GEMM result instead of the GEMM adding onto T·B).
        fwd_seq();
        CK(cudaMemcpyAsync(y_ref, y, (size_t)m * out * 2, cudaMemcpyDeviceToDevice, ms));
        CK(cudaMemsetAsync(y, 0xff, (size_t)m * out * 2, ms));
        fwd_side(side_lo);
        CK(cudaStreamSynchronize(ms));
        CK(cudaDeviceSynchronize());
        const auto p = to_host(y, (size_t)m * out), q = to_host(y_ref, (size_t)m * out);
        double e = 0, sc = 1e-30;
        for (size_t i = 0; i < p.size(); i++) {
            e = std::max(e, (double)std::fabs(p[i] - q[i]));
            sc = std::max(sc, (double)std::fabs(q[i]));
        }
        const bool good = e / sc < 2e-2;
        printf("check forward, side stream: max difference %.1e of the largest |y|  %s\n", e / sc, good ? "ok" : "FAIL");
        ok &= good;
    }

    // The pieces, and the two memory passes together.
    const double mb = (double)m * out * 2;
    printf("copy of dy (read + write) %.1f us\n", on_main_us([&] {
               CK(cudaMemcpyAsync(y2, dy, mb, cudaMemcpyDeviceToDevice, ms));
           }, 10));
    printf("G, dB, dA (one stream)    %.1f us\n", on_main_us([&] { grads_on(ms, h); }, 10));
    printf("merge                     %.1f us\n", on_main_us([&] { merge_on(ms); }, 10));
    for (int prio : {0, 1}) {
        cudaStream_t ss = prio ? side_hi : side_lo;
        printf("G, dB, dA beside the merge (side prio %s)  %.1f us\n", prio ? "high" : "low", on_main_us([&] {
                   CK(cudaEventRecord(fork_ev, ms));
                   CK(cudaStreamWaitEvent(ss, fork_ev));
                   merge_on(ss);
                   CK(cudaEventRecord(join_ev, ss));
                   grads_on(ms, h);
                   CK(cudaStreamWaitEvent(ms, join_ev));
               }, 10));
    }

    for (int round = 0; round < 2; round++) {
        ratio_vs("backward, one stream (as shipped)", bwd_seq, dx_gemm0, "GEMM");
        for (int prio : {0, 1}) {
            cudaStream_t ss = prio ? side_hi : side_lo;
            const char* p = prio ? "high" : "low";
            char name[96];
            snprintf(name, sizeof name, "backward, merge on the side (prio %s)", p);
            ratio_vs(name, [&] { bwd_merge_side(ss); }, dx_gemm0, "GEMM");
            snprintf(name, sizeof name, "backward, G/dB/dA on the side (prio %s)", p);
            ratio_vs(name, [&] { bwd_grads_side(ss); }, dx_gemm0, "GEMM");
            snprintf(name, sizeof name, "backward, merge side, dA beside GEMM (prio %s)", p);
            ratio_vs(name, [&] { bwd_da_late(ss); }, dx_gemm0, "GEMM");
        }
        ratio_vs("forward, one stream (as shipped)", fwd_seq, base0, "GEMM");
        ratio_vs("forward, T beside the GEMM, T·B added in place", [&] { fwd_side(side_lo); }, base0, "GEMM");
        ratio_vs("forward, side / one stream", [&] { fwd_side(side_lo); }, fwd_seq, "seq");
        ratio_vs("merge on the side (prio high) / one stream", [&] { bwd_merge_side(side_hi); }, bwd_seq, "seq");
        ratio_vs("merge on the side (prio low) / one stream", [&] { bwd_merge_side(side_lo); }, bwd_seq, "seq");
    }
    printf("checks %s\n", ok ? "passed" : "FAILED");
    return ok ? 0 : 1;
}
