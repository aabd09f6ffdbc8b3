// Entry points of the CPU similarity kernels. simd_kernels.inc is compiled four times, once per
// instruction-set level (isa_v2: x86-64-v2/SSE4.2, isa_v3: x86-64-v3/AVX2+FMA+F16C, isa_v4:
// x86-64-v4/AVX-512, isa_v4bf16: v4 + AVX512-BF16 for the bf16 loss); similarity.cpp picks the tables
// at run time from the CPU's features, so no AVX2, AVX-512 or BF16 instruction runs on a CPU without it.
#pragma once
#include <cstdint>

namespace galaxalign {

// One pair of the contrastive loss, L = scale * A @ B.T for row-major contiguous A, B (n x d).
// Forward: lse_row[i] = logsumexp_j L[i, j], lse_col[j] = logsumexp_i L[i, j] (n each).
template <typename T>
using LossForwardFn = void (*)(const T* a, const T* b, int64_t n, int64_t d, T scale, T* lse_row,
                               T* lse_col, int threads);

// Backward of coef * (sum_i lse_row[i] + sum_j lse_col[j]) given the forward statistics:
// G[i, j] = coef * (exp(L[i, j] - lse_row[i]) + exp(L[i, j] - lse_col[j]));
// grad_a += scale * G @ B, grad_b += scale * G.T @ A (n x d, accumulated into), *grad_scale = sum G * (A @ B.T).
template <typename T>
using LossBackwardFn = void (*)(const T* a, const T* b, int64_t n, int64_t d, T scale, const T* lse_row,
                                const T* lse_col, T coef, T* grad_a, T* grad_b, double* grad_scale, int threads);

// Streams one chunk of matrix rows (float32, or float16 bits when chunk_is_fp16) into the running
// top-k of every query. best_score/best_index (n x k) hold each query's best so far, sorted by
// (score desc, index asc); empty slots are (-inf, -1). Chunk row r has global index offset + r.
using TopkUpdateFn = void (*)(const float* queries, int64_t n, int64_t d, const void* chunk, bool chunk_is_fp16,
                              int64_t rows, int64_t offset, int64_t k, float* best_score, int64_t* best_index,
                              int threads);

// out (n x k) = softmax over the k prototypes of scale * features @ prototypes.T.
using PrototypeProbsFn = void (*)(const float* features, int64_t n, int64_t d, const float* prototypes,
                                  int64_t k, float scale, float* out, int threads);

// bf16 inputs (row-major n x d bfloat16 bits), fp32 statistics, gradients and accumulation: the same
// contracts as LossForwardFn<float> / LossBackwardFn<float>. Only the AVX512-BF16 table has them.
using LossForwardBf16Fn = void (*)(const uint16_t* a, const uint16_t* b, int64_t n, int64_t d, float scale,
                                   float* lse_row, float* lse_col, int threads);
using LossBackwardBf16Fn = void (*)(const uint16_t* a, const uint16_t* b, int64_t n, int64_t d, float scale,
                                    const float* lse_row, const float* lse_col, float coef, float* grad_a,
                                    float* grad_b, double* grad_scale, int threads);

struct KernelTable {
  const char* isa;
  LossForwardFn<float> loss_forward_f32;
  LossForwardFn<double> loss_forward_f64;
  LossBackwardFn<float> loss_backward_f32;
  LossBackwardFn<double> loss_backward_f64;
  TopkUpdateFn topk_update;
  PrototypeProbsFn prototype_probs;
  LossForwardBf16Fn loss_forward_bf16;    // nullptr except in isa_v4bf16
  LossBackwardBf16Fn loss_backward_bf16;  // nullptr except in isa_v4bf16
};

namespace isa_v2 {
const KernelTable& kernel_table();
}
namespace isa_v3 {
const KernelTable& kernel_table();
}
namespace isa_v4 {
const KernelTable& kernel_table();
}
namespace isa_v4bf16 {  // kernels_v4bf16.cpp: x86-64-v4 + AVX512-BF16 (its bf16 loss is what is used)
const KernelTable& kernel_table();
}

}  // namespace galaxalign
