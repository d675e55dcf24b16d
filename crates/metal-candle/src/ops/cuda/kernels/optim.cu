// AdamW's update in two in-place element-wise passes over f32 buffers (see
// train/adamw_update.rs): the moments `state` = [m; v] (2n floats), then the parameter.
// The arithmetic and its order match the CPU pass.
#include <stdint.h>

extern "C" __global__ void adamw_moments(float* state, const float* g, uint64_t n, float beta1, float beta2,
                                         float grad_scale) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * grad_scale;
        state[i] = state[i] * beta1 + gi * (1.f - beta1);
        state[n + i] = state[n + i] * beta2 + gi * gi * (1.f - beta2);
    }
}

extern "C" __global__ void adamw_param(float* p, const float* state, uint64_t n, float lr, float bc1, float bc2,
                                       float eps, float decay) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float update = (state[i] / bc1) / (sqrtf(state[n + i] / bc2) + eps);
        p[i] = p[i] * decay - update * lr;
    }
}
