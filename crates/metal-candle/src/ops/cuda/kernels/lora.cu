// Helper for the LoRA GEMMs: fills one column of a row-major (rows, ld) matrix with a value.
// lora_linear with a bias builds T' = [scale·(x·A) | 1] so that the bias rides in the small
// GEMM T'·[B; bias] instead of needing its own pass over the (tokens × out) output.
#include "common.cuh"

#define LORA_KERNELS(NAME, T, V)                                                                  \
    extern "C" __global__ void set_col_##NAME(T* buf, int rows, int ld, int col, float value) {  \
        for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) \
            buf[(size_t)r * ld + col] = from_f<T>(value);                                         \
    }
MC_FOR_TYPES(LORA_KERNELS)
