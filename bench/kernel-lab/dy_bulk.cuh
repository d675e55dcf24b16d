// A variant of lora_dy_grads kept in the lab, not in the library: the pass over dy streamed by
// Hopper bulk copies (TMA). Included by tclab.cu after kernels/lora_tc.cu, whose helpers
// (MmaOp, transpose8x8, pair, L_LD) it uses.
#pragma once

// lora_dy_grads_bulk: the same pass with dy and T streamed by Hopper bulk copies (sm_90 and
// later): per step one `cp.async.bulk` per row of the slab (up to 1 KiB) and one of T's 16 × 16
// tile (512 contiguous bytes of T (m, 16)), issued by warp 0's lanes side by side and completing
// on the stage's mbarrier, in place of every thread's 16-byte cp.async copies (~160 instructions
// per warp and step). The slab's rows lie in shared memory at a stride of 1024 + 64 bytes, so
// that the eight lanes of a quarter warp (rows g and g + 1, 64 bytes each) hit all 32 banks; T's
// tile is read with one ldmatrix.trans. The arithmetic, the G reduction and the stores are
// lora_dy_grads' (the outputs are bit for bit the same).
//
// Not in the library: no faster. Measured on an H200 (tclab, bf16, m 16384, n 4096, r 16):
// the pass 52.4–52.9 µs against lora_dy_grads' 51.6–51.9 (thread 0 issuing the copies alone:
// 55.5), with the sums 59.4 against 58.1; 3 to 5 stages, 3 blocks per SM and staggered walks
// alike. Without any products (copies, waits, barriers and stores only) it still takes 47 µs:
// the copies' instruction issue is not what holds the pass at 51 µs.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MC_BULK_COPY 1
#else
#define MC_BULK_COPY 0
#endif

// The ring's stages (the copies of the next BULK_STAGES − 1 steps are in flight while a step is
// computed), and a stage's layout: 16 rows of the slab, then T's tile. Dynamic shared memory:
// BULK_STAGES · BULK_STAGE_BYTES = 70 KiB (two blocks per SM with the 16 KiB of the G buffers).
constexpr int BULK_STAGES = 4;
constexpr int BULK_ROW_BYTES = 1024 + 64;
constexpr int BULK_L_OFFSET = 16 * BULK_ROW_BYTES;
constexpr int BULK_STAGE_BYTES = BULK_L_OFFSET + 16 * L_LD * 2;
static_assert(2 * (BULK_STAGES * BULK_STAGE_BYTES + 16 * 1024 + 1024) <= 228 * 1024, "two blocks per SM");

#if MC_BULK_COPY
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Thread 0's arrival on a stage's barrier, announcing the bytes its copies will bring.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned).
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
#endif

// As lora_dy_grads (same arguments, same Gp and Pp), for any m (a chunk's last step may have
// fewer than 16 rows). Host preconditions: sm_90 or later (on earlier architectures the
// kernel traps), n % 8 == 0, D and T 16-byte aligned, T (m, 16) dense (ld 16),
// rows_per_chunk % 16 == 0, 256 threads, grid (⌈n/512⌉, ⌈m/rows_per_chunk⌉), dynamic shared
// memory STAGES · BULK_STAGE_BYTES (over 48 KiB: cudaFuncAttributeMaxDynamicSharedMemorySize).
//
// LANES: warp 0's lanes issue the copies side by side (lane i row i, lane 16 T's tile) rather
// than thread 0 one after another. STAGGER: chunk c starts its walk at step ⌊c·steps/chunks⌋
// and wraps around, so that the chunks (rows_per_chunk apart, often a power of two of bytes)
// do not read addresses equal modulo a large power of two at the same time; dB's partial sums
// then add the rows in another order than lora_dy_grads'. MATH false (the lab's diagnostic): no
// products, only the copies, the waits, the barriers and the stores (of zeros).
template <typename T, int STAGES, bool LANES = true, bool STAGGER = false, bool MATH = true>
__device__ void lora_dy_grads_bulk(const T* __restrict__ D, const T* __restrict__ L, const T* __restrict__ B,
                                   long long sb0, long long sb1, float* __restrict__ Gp, float* __restrict__ Pp, int m,
                                   int n, int r, int rows_per_chunk) {
#if MC_BULK_COPY
    __shared__ float gbuf[2][8][256];
    __shared__ alignas(8) uint64_t full[STAGES];
    extern __shared__ __align__(128) unsigned char bulk_ring[];  // [stage][16 rows of D, stride BULK_ROW_BYTES | T's tile]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int slab = blockIdx.x, chunk = blockIdx.y;
    const int strip = slab * 512 + warp * 64;
    const int width = min(512, n - slab * 512);  // the slab's columns, a multiple of 8
    const T zero = from_f<T>(0.f);
    bool col_ok[2];
#pragma unroll
    for (int h = 0; h < 2; h++) col_ok[h] = strip + 32 * h + 8 * c < n;
    uint32_t gb[2][2][2][2];  // B's fragments for G, as in lora_dy_grads
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int s = 0; s < 2; s++)
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int rank = 8 * u + g, col = strip + 32 * h + 8 * c + 4 * s;
                auto bv = [&](int cc) { return (rank < r && col_ok[h]) ? B[rank * sb0 + (long long)cc * sb1] : zero; };
                gb[h][s][u][0] = pair(bv(col), bv(col + 1));
                gb[h][s][u][1] = pair(bv(col + 2), bv(col + 3));
            }
    float acc[2][4][4];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[h][i][0] = acc[h][i][1] = acc[h][i][2] = acc[h][i][3] = 0.f;
    const int row_start = chunk * rows_per_chunk;
    const int row_end = min(m, row_start + rows_per_chunk);
    const int steps = (row_end - row_start + 15) / 16;
    const int offset = STAGGER && steps > 0 ? (int)((long long)chunk * steps / gridDim.y) : 0;
    auto first_row = [&](int step) {  // the first row of the step'th step of the walk
        int s = step + offset;
        if (STAGGER && s >= steps) s -= steps;
        return row_start + 16 * s;
    };
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(bulk_ring);
    const uint32_t bar0 = (uint32_t)__cvta_generic_to_shared(full);
    // The columns past n of a narrow last slab: zero once (the copies never write them), so
    // that they meet B's zero fragments as zeros, not as whatever shared memory held.
    if (width < 512) {
        const int packs = (512 - width) / 8;  // 16-byte packs per row
        for (int i = tid; i < STAGES * 16 * packs; i += 256) {
            const int row = i / packs, p = i % packs;
            *reinterpret_cast<uint4*>(bulk_ring + (row >> 4) * BULK_STAGE_BYTES + (row & 15) * BULK_ROW_BYTES +
                                      2 * width + 16 * p) = make_uint4(0, 0, 0, 0);
        }
    }
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; s++) mbar_init(bar0 + 8 * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // The zeros (generic proxy) before any bulk copy (async proxy) into the ring.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    // Thread 0 (warp 0 where LANES): the copies of step `step` into its stage. The stage was
    // last read in step − STAGES + 1 ≤ the step before this one, whose barrier every thread has
    // passed.
    auto issue = [&](int step) {
        if (step >= steps) return;
        const int stage = step % STAGES, row0 = first_row(step), rows = min(16, row_end - row0);
        const uint32_t bar = bar0 + 8 * stage, dst = ring + stage * BULK_STAGE_BYTES, bytes = 2 * width;
        const T* src = D + (size_t)row0 * n + slab * 512;
        if (LANES) {
            if (lane == 0) mbar_expect_tx(bar, rows * (bytes + 2 * L_LD));
            __syncwarp();
            if (lane < rows) bulk_copy(dst + lane * BULK_ROW_BYTES, src + (size_t)lane * n, bytes, bar);
            else if (lane == 16) bulk_copy(dst + BULK_L_OFFSET, L + (size_t)row0 * L_LD, rows * 2 * L_LD, bar);
        } else {
            mbar_expect_tx(bar, rows * (bytes + 2 * L_LD));
            for (int i = 0; i < rows; i++) bulk_copy(dst + i * BULK_ROW_BYTES, src + (size_t)i * n, bytes, bar);
            bulk_copy(dst + BULK_L_OFFSET, L + (size_t)row0 * L_LD, rows * 2 * L_LD, bar);
        }
    };
    const bool issuer = LANES ? warp == 0 : tid == 0;
    if (issuer) {
#pragma unroll
        for (int p = 0; p < STAGES - 1; p++) issue(p);
    }
    int parity = 0;
    // ldmatrix's row address of this lane in T's tile: matrix j = lane / 8 (rows 8·(j/2) …,
    // ranks 8·(j%2) …), its row lane % 8.
    const uint32_t l_addr = BULK_L_OFFSET + 2 * (((lane & 7) + 8 * (lane >> 4)) * L_LD + 8 * ((lane >> 3) & 1));
    for (int step = 0; step < steps; step++) {
        if (issuer) issue(step + STAGES - 1);
        const int stage = step % STAGES;
        mbar_wait(bar0 + 8 * stage, (step / STAGES) & 1);
        const unsigned char* sb = bulk_ring + stage * BULK_STAGE_BYTES;
        uint4 cur[2][2];
#pragma unroll
        for (int v = 0; v < 2; v++)
#pragma unroll
            for (int h = 0; h < 2; h++)
                cur[v][h] = *reinterpret_cast<const uint4*>(sb + (g + 8 * v) * BULK_ROW_BYTES + 2 * (warp * 64 + 32 * h + 8 * c));
        // Lᵀ as the A operand (16 ranks × 16 rows), as lora_dy_grads' la: one ldmatrix.trans.
        uint32_t la[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(la[0]), "=r"(la[1]), "=r"(la[2]), "=r"(la[3])
                     : "r"(ring + stage * BULK_STAGE_BYTES + l_addr)
                     : "memory");
        const int row0 = first_row(step), rows = row_end - row0;
        if (rows < 16) {  // the chunk's last rows: rows past its end hold stale or no data
#pragma unroll
            for (int v = 0; v < 2; v++)
                if (g + 8 * v >= rows) cur[v][0] = cur[v][1] = make_uint4(0, 0, 0, 0);
            auto keep = [&](uint32_t x, int row) {
                return row >= rows ? 0u : row + 1 >= rows ? (x & 0xffffu) : x;
            };
            la[0] = keep(la[0], 2 * c);
            la[1] = keep(la[1], 2 * c);
            la[2] = keep(la[2], 2 * c + 8);
            la[3] = keep(la[3], 2 * c + 8);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t w0[4] = {cur[0][h].x, cur[0][h].y, cur[0][h].z, cur[0][h].w};
            const uint32_t w1[4] = {cur[1][h].x, cur[1][h].y, cur[1][h].z, cur[1][h].w};
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (MATH) MmaOp<T>::run(acc[h][i], la, transpose8x8(w0[i]), transpose8x8(w1[i]));
        }
        float ga[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t w0[4] = {cur[0][h].x, cur[0][h].y, cur[0][h].z, cur[0][h].w};
            const uint32_t w1[4] = {cur[1][h].x, cur[1][h].y, cur[1][h].z, cur[1][h].w};
#pragma unroll
            for (int s = 0; s < 2; s++) {
                const uint32_t a[4] = {w0[2 * s], w1[2 * s], w0[2 * s + 1], w1[2 * s + 1]};
#pragma unroll
                for (int u = 0; u < 2; u++)
                    if (MATH) MmaOp<T>::run(ga[u], a, gb[h][s][u][0], gb[h][s][u][1]);
            }
        }
        float* buf = gbuf[parity][warp];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            buf[g * 16 + 8 * u + 2 * c] = ga[u][0];
            buf[g * 16 + 8 * u + 2 * c + 1] = ga[u][1];
            buf[(g + 8) * 16 + 8 * u + 2 * c] = ga[u][2];
            buf[(g + 8) * 16 + 8 * u + 2 * c + 1] = ga[u][3];
        }
        __syncthreads();  // also: every thread's reads of this stage are done before its reuse
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) sum += gbuf[parity][w][tid];
        const int row = row0 + tid / 16;
        if (row < row_end) Gp[((size_t)slab * m + row) * 16 + (tid & 15)] = sum;
        parity ^= 1;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int col = strip + 32 * h + 8 * c + 2 * i;
            if (col >= n) continue;
            *reinterpret_cast<float2*>(Pp + ((size_t)chunk * 16 + g) * n + col) = make_float2(acc[h][i][0], acc[h][i][1]);
            *reinterpret_cast<float2*>(Pp + ((size_t)chunk * 16 + g + 8) * n + col) =
                make_float2(acc[h][i][2], acc[h][i][3]);
        }
    }
#else
    __trap();  // no bulk copies before sm_90: the host launches lora_dy_grads there
#endif
}

// lora_dy_grads_bulk_{T}: lora_dy_grads_{T}'s arguments and outputs (Gp, Pp; sum_two_parts adds
// them up alike), for sm_90 and later, dynamic shared memory BULK_STAGES · BULK_STAGE_BYTES.
#define LORA_DY_GRADS_BULK_KERNEL(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) lora_dy_grads_bulk_##NAME(                                       \
        const T* D, const T* L, const T* B, long long sb0, long long sb1, float* Gp, float* Pp, int m, int n, int r,     \
        int rows_per_chunk) {                                                                                          \
        lora_dy_grads_bulk<T, BULK_STAGES>(D, L, B, sb0, sb1, Gp, Pp, m, n, r, rows_per_chunk);                        \
    }
LORA_DY_GRADS_BULK_KERNEL(bf16, __nv_bfloat16)
LORA_DY_GRADS_BULK_KERNEL(f16, __half)
