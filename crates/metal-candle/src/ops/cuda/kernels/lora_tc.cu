// Tensor-core kernels for the LoRA linear layer's thin products at large sizes (bf16 and f16,
// sm_80 and later: mma.sync m16n8k16 with f32 accumulation, movmatrix).
//
// cuBLAS runs these products well below the memory rate they are bound by (an H200, bf16,
// m 16384, in = out = 4096, r = 16: `y = T·B` writes at 67% of the write ceiling, and
// `G = dy·Bᵀ` and `dB = Tᵀ·dy` each read dy once more). Their arithmetic is small (r = 16
// multiply-adds per element moved) but too much for the CUDA cores to keep pace with HBM, so
// they run on the tensor cores, and the kernels are shaped around the memory traffic:
//
// lora_outer: `y = alpha·L·Rᵀ (+ bias) (+ C)`, L (m, r) and R (n, r) by strides: the forward's
// `T·B`, the backward's `G·Aᵀ`, and the merged weight `W + scale·Bᵀ·Aᵀ` (C = W, L = Bᵀ read
// through B's strides) that the backward's dx GEMM takes in place of W. A warp owns 64 output
// columns (its R fragments stay in registers) and walks down 16-row tiles; the columns of its
// mma tiles are permuted so that every thread ends with two runs of 8 consecutive outputs of a
// row, and the four threads of a row write 64 contiguous bytes per store instruction.
//
// lora_dy_grads: one read of dy (m, n) for both of the backward's products that read it,
// `G = dy·Bᵀ` (m, r) and `dB = Tᵀ·dy` (r, n). A thread's 16-byte packs of two rows of dy are, as
// loaded, the A operand of `dy·Bᵀ` (the reduction index k runs over the pack's columns in a
// permuted order, and B's fragments are loaded in the same order), and `movmatrix.trans` turns
// them into the B operand of `Tᵀ·dy` (k over rows). A warp owns 64 columns of a 512-column slab;
// a block's eight warps cover the slab and walk down a chunk of rows, streaming dy and T through
// a ring of cp.async copies in shared memory several steps deep. Partial sums go to f32 scratch
// without atomics: G's per slab (the eight warps' parts meet in shared memory first), dB's per
// row chunk; `sum_two_parts` adds both up afterwards in one launch (deterministic).
//
// Measured on an H200 (bench/kernel-lab/tclab.cu, bf16, m 16384, in = out = 4096, r = 16):
// lora_outer 41 µs where cuBLAS takes 46–48; lora_dy_grads with its sums 62 µs where cuBLAS's
// two GEMMs take 36 + 38. Tried and not kept (the lab's history): staging lora_outer's tile
// through shared memory for whole 128-byte rows (43 µs), ldmatrix.trans instead of movmatrix
// (no faster), the same kernel for dA = scale·xᵀ·G (48 µs against cuBLAS's 38).
#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MC_TENSOR_CORES 1
#else
#define MC_TENSOR_CORES 0
#endif

__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }

// Two elements in one register, the lower index in the low half (the mma operand layout).
template <typename T>
__device__ __forceinline__ uint32_t pair(T lo, T hi) { return bits16(lo) | (bits16(hi) << 16); }

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if MC_TENSOR_CORES
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};
template <> struct MmaOp<__half> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if MC_TENSOR_CORES
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

// The transpose of an 8×8 matrix of 16-bit values held one register per thread (row lane/4,
// columns 2·(lane%4) and +1): afterwards the thread holds column lane/4, rows 2·(lane%4) and +1.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t v) {
    uint32_t out = v;
#if MC_TENSOR_CORES
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(out) : "r"(v));
#endif
    return out;
}

// y[row][col] = alpha · Σ_j L[row][j]·R[col][j] + bias[col] (without ADD) or + C[row][col]
// (with ADD) for j < r ≤ 16·KC, with L[row][j] at row·ld_l + j (+ j·l_col with ADD, which the
// merged weight reads Bᵀ through) and R[col][j] at col·rc + j·rk. The host guarantees n % 8 == 0
// and y and C 16-byte aligned (dense rows of n). ADD is a template argument, not a null test:
// the kernel without it keeps its registers and schedule. Blocks of whole warps; warp w of
// block (bx, by) takes columns [64·(bx·warps + w), +64) and rows [16·tiles·by, +16·tiles).
template <typename T, int KC, bool ADD>
__device__ void lora_outer(const T* __restrict__ L, long long ld_l, long long l_col, const T* __restrict__ R, long long rc,
                           long long rk, const T* __restrict__ bias, const T* __restrict__ addend, T* __restrict__ y, int m,
                           int n, int r, int tiles, float alpha) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int strip = (blockIdx.x * (blockDim.x >> 5) + warp) * 64;
    if (strip >= n) return;  // no barriers below: a warp may leave alone
    const T zero = from_f<T>(0.f);
    // R's fragments, tile t (8 columns), chunk q (16 ranks). The tile's column g is the strip's
    // column 32·(t/4) + 8·(g/2) + 2·(t%4) + g%2, so that a thread's accumulators (columns 2c,
    // 2c+1 of every tile) are the strip's columns 8c … 8c+7 and 32 + 8c … 32 + 8c+7: each store
    // instruction then writes 64 contiguous bytes of every row it touches (whole 32-byte sectors).
    uint32_t rf[KC][8][2];
#pragma unroll
    for (int t = 0; t < 8; t++) {
        const int col = strip + 32 * (t >> 2) + 8 * (g >> 1) + 2 * (t & 3) + (g & 1);
#pragma unroll
        for (int q = 0; q < KC; q++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int j = 16 * q + 2 * c + 8 * h;
                const T lo = (col < n && j < r) ? R[col * rc + j * rk] : zero;
                const T hi = (col < n && j + 1 < r) ? R[col * rc + (j + 1) * rk] : zero;
                rf[q][t][h] = pair(lo, hi);
            }
    }
    float bv[2][8];
#pragma unroll
    for (int p = 0; p < 2; p++)
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int col = strip + 32 * p + 8 * c + e;
            bv[p][e] = (!ADD && bias && col < n) ? to_f(bias[col]) : 0.f;
        }
    // L's fragment of a row tile: rows g and g + 8, ranks 2c, 2c+1 and + 8 of each chunk.
    auto load_l = [&](int row0, uint32_t (&a)[KC][4]) {
        const int ra = row0 + g, rb = row0 + g + 8;
        // L's column stride is 1 in the plain kernel: a constant, so that it costs no register.
        const long long lc = ADD ? l_col : 1;
        auto lv = [&](int row, int j) { return (row < m && j < r) ? L[row * ld_l + j * lc] : zero; };
#pragma unroll
        for (int q = 0; q < KC; q++) {
            const int j = 16 * q + 2 * c;
            a[q][0] = pair(lv(ra, j), lv(ra, j + 1));
            a[q][1] = pair(lv(rb, j), lv(rb, j + 1));
            a[q][2] = pair(lv(ra, j + 8), lv(ra, j + 9));
            a[q][3] = pair(lv(rb, j + 8), lv(rb, j + 9));
        }
    };
    const int first = blockIdx.y * tiles * 16;
    uint32_t a[KC][4];
    load_l(first, a);
    for (int tile = 0; tile < tiles; tile++) {
        const int row0 = first + tile * 16;
        if (row0 >= m) break;
        uint32_t a_next[KC][4];
        load_l(row0 + 16, a_next);  // in flight while this tile is computed and stored
        // The addend's packs at the positions this thread stores, loaded before the products so
        // that their latency overlaps them. (Loading the next tile's here instead, two tiles in
        // flight per warp, was no faster: bench/kernel-lab/tclab.cu, session 12.)
        Pack<T, 8> cpk[2][2];
        if constexpr (ADD) {
#pragma unroll
            for (int half = 0; half < 2; half++)
#pragma unroll
                for (int p = 0; p < 2; p++) {
                    const int row = row0 + g + 8 * half, col = strip + 32 * p + 8 * c;
                    if (row < m && col < n) cpk[half][p] = load_raw<T, 8>(addend + (size_t)row * n + col);
                }
        }
        float acc[8][4];
#pragma unroll
        for (int t = 0; t < 8; t++) {
            acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll
            for (int q = 0; q < KC; q++) MmaOp<T>::run(acc[t], a[q], rf[q][t][0], rf[q][t][1]);
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = row0 + g + 8 * half;
            if (row >= m) continue;
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const int col = strip + 32 * p + 8 * c;
                if (col >= n) continue;
                float o[8], cv[8] = {};
                if constexpr (ADD) unpack<T, 8>(cpk[half][p], cv);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = alpha * acc[4 * p + e / 2][2 * half + (e & 1)] + bv[p][e] + cv[e];
                store<T, 8>(y + (size_t)row * n + col, o);
            }
        }
#pragma unroll
        for (int q = 0; q < KC; q++)
#pragma unroll
            for (int i = 0; i < 4; i++) a[q][i] = a_next[q][i];
    }
}

// Stages of the ring through which lora_dy_grads streams D and L: the copies of the next
// GRAD_STAGES − 1 steps are in flight while a step is computed (with the next step's only, the
// kernel read dy at half the memory's rate). 20 KiB per stage and block.
constexpr int GRAD_STAGES = 4;
// L's leading dimension in lora_dy_grads: a row of 16 ranks is 32 bytes, two 16-byte copies.
constexpr int L_LD = 16;

// One read of D (m, n), dense rows, n % 8 == 0, 16-byte aligned, for
//   Gp[slab][row][κ] = Σ_{col in slab} D[row][col]·B[κ][col]    (κ < 16, B[κ][col] at κ·sb0 + col·sb1)
//   Pp[chunk][κ][col] = Σ_{row in chunk} L[row][κ]·D[row][col]  (κ < 16)
// with L (m, 16) dense and 16-byte aligned; B's ranks ≥ r are read as zero, and L's columns past
// r only reach the rows of Pp past r (which the host does not read). 256 threads (eight warps,
// 64 columns each: a slab of 512); block (slab, chunk) takes rows [chunk·rows_per_chunk,
// +rows_per_chunk), rows_per_chunk % 16 == 0. Dynamic shared memory: GRAD_STAGES · 20 KiB, the
// ring: per stage and warp, each lane's four packs of D (read back only by that lane) and the
// step's 16 × 16 tile of L (copied by all 32 lanes, read by all after a warp barrier).
template <typename T>
__device__ void lora_dy_grads(const T* __restrict__ D, const T* __restrict__ L, const T* __restrict__ B,
                                long long sb0, long long sb1, float* __restrict__ Gp, float* __restrict__ Pp, int m, int n,
                                int r, int rows_per_chunk) {
    __shared__ float gbuf[2][8][256];
    extern __shared__ uint4 ring[];  // [stage][warp][q: D packs 2v + h, then 4: L's tile][lane]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int slab = blockIdx.x, chunk = blockIdx.y;
    const int strip = slab * 512 + warp * 64;
    const T zero = from_f<T>(0.f);
    // Column of pack h (0, 1) of this thread: 8 columns from strip + 32h + 8c.
    bool col_ok[2];
#pragma unroll
    for (int h = 0; h < 2; h++) col_ok[h] = strip + 32 * h + 8 * c < n;
    // B's fragments for G, in the order the packs give k: chunk (h, s) of D·Bᵀ takes, for
    // thread c, columns 32h + 8c + 4s + {0, 1} (k = 2c, 2c+1) and + {2, 3} (k = 2c+8, 2c+9).
    uint32_t gb[2][2][2][2];  // [h][s][u: ranks 8u…8u+7][reg]
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
    float acc[2][4][4];  // Pp's part: [h][i: 8-column tile][fragment]
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[h][i][0] = acc[h][i][1] = acc[h][i][2] = acc[h][i][3] = 0.f;
    const int row_start = chunk * rows_per_chunk;
    const int row_end = min(m, row_start + rows_per_chunk);
    const int steps = (row_end - row_start + 15) / 16;
    auto slot = [&](int stage, int q) -> uint4* { return &ring[((stage * 8 + warp) * 5 + q) * 32 + lane]; };
    // Starts the copies of step `step` into its stage (zeros where rows or columns run out);
    // one commit group per step, empty past the last.
    auto issue = [&](int step) {
        if (step < steps) {
            const int stage = step % GRAD_STAGES, row0 = row_start + 16 * step;
#pragma unroll
            for (int v = 0; v < 2; v++) {
                const int row = row0 + g + 8 * v;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    uint4* dst = slot(stage, 2 * v + h);
                    if (row < row_end && col_ok[h]) copy_async16(dst, D + (size_t)row * n + strip + 32 * h + 8 * c);
                    else *dst = make_uint4(0, 0, 0, 0);
                }
            }
            const int lrow = row0 + (lane >> 1);
            uint4* dst = slot(stage, 4);
            if (lrow < row_end) copy_async16(dst, L + (size_t)lrow * L_LD + (lane & 1) * 8);
            else *dst = make_uint4(0, 0, 0, 0);
        }
        copy_commit();
    };
#pragma unroll
    for (int p = 0; p < GRAD_STAGES - 1; p++) issue(p);
    int parity = 0;
    for (int step = 0; step < steps; step++) {
        copy_wait<GRAD_STAGES - 2>();  // this step's copies are done (this lane's) ...
        __syncwarp();                  // ... and every lane's; all read the previous stage
        issue(step + GRAD_STAGES - 1);  // into the stage the previous step used
        const int stage = step % GRAD_STAGES;
        uint4 cur[2][2];
#pragma unroll
        for (int v = 0; v < 2; v++)
#pragma unroll
            for (int h = 0; h < 2; h++) cur[v][h] = *slot(stage, 2 * v + h);
        // Lᵀ as the A operand (16 ranks × 16 rows): rows 2c, 2c+1 (+8), ranks g (+8).
        const T* lt = reinterpret_cast<const T*>(&ring[((stage * 8 + warp) * 5 + 4) * 32]);
        uint32_t la[4];
        la[0] = pair(lt[(2 * c) * L_LD + g], lt[(2 * c + 1) * L_LD + g]);
        la[1] = pair(lt[(2 * c) * L_LD + g + 8], lt[(2 * c + 1) * L_LD + g + 8]);
        la[2] = pair(lt[(2 * c + 8) * L_LD + g], lt[(2 * c + 9) * L_LD + g]);
        la[3] = pair(lt[(2 * c + 8) * L_LD + g + 8], lt[(2 * c + 9) * L_LD + g + 8]);
        // Register i of pack h, rows g and g + 8, is an 8×8 block whose column 2c+e is the
        // column 32h + 8c + 2i + e; transposed it is the B operand of Lᵀ·D for that tile.
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t w0[4] = {cur[0][h].x, cur[0][h].y, cur[0][h].z, cur[0][h].w};
            const uint32_t w1[4] = {cur[1][h].x, cur[1][h].y, cur[1][h].z, cur[1][h].w};
#pragma unroll
            for (int i = 0; i < 4; i++) MmaOp<T>::run(acc[h][i], la, transpose8x8(w0[i]), transpose8x8(w1[i]));
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
                for (int u = 0; u < 2; u++) MmaOp<T>::run(ga[u], a, gb[h][s][u][0], gb[h][s][u][1]);
            }
        }
        // The eight warps' parts of this step's 16 × 16 G tile meet in shared memory
        // (alternate buffers: one barrier per step).
        float* buf = gbuf[parity][warp];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            buf[g * 16 + 8 * u + 2 * c] = ga[u][0];
            buf[g * 16 + 8 * u + 2 * c + 1] = ga[u][1];
            buf[(g + 8) * 16 + 8 * u + 2 * c] = ga[u][2];
            buf[(g + 8) * 16 + 8 * u + 2 * c + 1] = ga[u][3];
        }
        __syncthreads();
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) sum += gbuf[parity][w][tid];
        const int row = row_start + 16 * step + tid / 16;
        if (row < row_end) Gp[((size_t)slab * m + row) * 16 + (tid & 15)] = sum;
        parity ^= 1;
    }
    // acc[h][i]: ranks g and g + 8, columns 32h + 8c + 2i and + 1.
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
}

// One sum of partial products: out[i·oi + j·oj] = scale · Σ_{s < S} P[(s·I + i)·J + j] for
// i < iu, j < ju, in the output's dtype and layout. Passed by value (kernel parameters).
template <typename T>
struct PartSum {
    const float* P;
    T* out;
    long long oi, oj;
    int S, I, J, iu, ju;
    float scale;
};

// Both sums of lora_dy_grads' parts (G's and dB's) in one launch: blockIdx.y picks the sum.
template <typename T>
__device__ void sum_parts(const PartSum<T> q) {
    const long long total = (long long)q.iu * q.ju;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long i = idx / q.ju, j = idx % q.ju;
        float s = 0.f;
        for (int p = 0; p < q.S; p++) s += q.P[((long long)p * q.I + i) * q.J + j];
        q.out[i * q.oi + j * q.oj] = from_f<T>(q.scale * s);
    }
}

// lora_outer_k{KC}_{T}, and lora_outer_add_k{KC}_{T} with the addend (the other takes it too, unused).
#define LORA_OUTER_KERNEL(NAME, T, KC, ADD, PREFIX)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) PREFIX##_k##KC##_##NAME(                                        \
        const T* L, long long ld_l, long long l_col, const T* R, long long rc, long long rk, const T* bias,            \
        const T* addend, T* y, int m, int n, int r, int tiles, float alpha) {                                          \
        lora_outer<T, KC, ADD>(L, ld_l, l_col, R, rc, rk, bias, addend, y, m, n, r, tiles, alpha);                    \
    }
#define LORA_TC_KERNELS(NAME, T)                                                                                       \
    LORA_OUTER_KERNEL(NAME, T, 1, false, lora_outer)                                                                   \
    LORA_OUTER_KERNEL(NAME, T, 2, false, lora_outer)                                                                   \
    LORA_OUTER_KERNEL(NAME, T, 1, true, lora_outer_add)                                                                \
    LORA_OUTER_KERNEL(NAME, T, 2, true, lora_outer_add)                                                                \
    extern "C" __global__ void __launch_bounds__(256) lora_dy_grads_##NAME(                                            \
        const T* D, const T* L, const T* B, long long sb0, long long sb1, float* Gp, float* Pp, int m, int n, int r,     \
        int rows_per_chunk) {                                                                                          \
        lora_dy_grads<T>(D, L, B, sb0, sb1, Gp, Pp, m, n, r, rows_per_chunk);                                          \
    }                                                                                                                  \
    extern "C" __global__ void sum_two_parts_##NAME(PartSum<T> first, PartSum<T> second) {                             \
        sum_parts<T>(blockIdx.y == 0 ? first : second);                                                                \
    }

LORA_TC_KERNELS(bf16, __nv_bfloat16)
LORA_TC_KERNELS(f16, __half)
