// What the two-stream labs (overlaplab.cu, sidelab.cu) share: a main stream and a side stream
// of each priority, the events that order them, and timing on the main stream. Include after
// tclab.cu (for `median`).
#pragma once

static cudaStream_t ms, side_lo, side_hi;
static cudaEvent_t ta, tb, fork_ev, join_ev;

// The streams (non-blocking: the legacy default stream would order them) and events.
static void create_streams() {
    int lo, hi;
    CK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    CK(cudaStreamCreateWithFlags(&ms, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithPriority(&side_lo, cudaStreamNonBlocking, lo));
    CK(cudaStreamCreateWithPriority(&side_hi, cudaStreamNonBlocking, hi));
    for (cudaEvent_t* ev : {&ta, &tb}) CK(cudaEventCreate(ev));
    for (cudaEvent_t* ev : {&fork_ev, &join_ev}) CK(cudaEventCreateWithFlags(ev, cudaEventDisableTiming));
}

// Per-call µs of `per_batch` calls of f queued on the main stream.
static float on_main_us(const std::function<void()>& f, int per_batch) {
    CK(cudaEventRecord(ta, ms));
    for (int i = 0; i < per_batch; i++) f();
    CK(cudaEventRecord(tb, ms));
    CK(cudaEventSynchronize(tb));
    float ms_;
    CK(cudaEventElapsedTime(&ms_, ta, tb));
    return ms_ * 1000.f / per_batch;
}
// Alternating batches of f and g; medians of each and of the per-pair ratios f/g (g named
// `gname` in the line printed).
static float ratio_vs(const char* what, const std::function<void()>& f, const std::function<void()>& g,
                      const char* gname = "GEMM") {
    for (int i = 0; i < 3; i++) { f(); g(); }
    std::vector<float> tf, tg, ratio;
    for (int i = 0; i < 15; i++) {
        const float a = on_main_us(f, 5), b = on_main_us(g, 5);
        tf.push_back(a); tg.push_back(b); ratio.push_back(a / b);
    }
    CK(cudaGetLastError());
    printf("%-58s %8.1f us, %s %8.1f us, ratio %.3f\n", what, median(tf), gname, median(tg), median(ratio));
    fflush(stdout);
    return median(ratio);
}
