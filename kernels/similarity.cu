// CUDA similarity kernels: fused contrastive loss (row/column log-sum-exp, gradients), streamed
// top-k and prototype probabilities. Same semantics as csrc/simd_kernels.inc; tiles are staged in
// shared memory, every product accumulates in fp32, inputs may be fp32, bf16 or fp16.
//
// One "row sweep" pattern serves the loss: a block owns BM rows of the left operand and sweeps all
// rows of the right operand in BN-row tiles, keeping an online log-sum-exp per owned row. Column
// statistics are the row statistics of the transposed problem (L.T = s * B @ A.T), so the forward
// is two sweeps (rows, then columns) and the backward two more (grad A, then grad B); each block
// owns its output rows, so no atomics touch the gradients and only O(n) statistics are stored.
//
// Bound on raw device pointers and the caller's stream: no torch headers are needed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace galaxalign_cuda {
namespace {

constexpr int BM = 64;        // rows owned by a block
constexpr int BN = 64;        // rows of the swept operand per tile
constexpr int BK = 32;        // depth of one shared-memory slab
constexpr int DC = 64;        // gradient columns produced per pass
constexpr int THREADS = 256;  // 16 x 16 threads, each with a 4 x 4 register tile
constexpr int TM = 4, TN = 4;
constexpr int PAD = BM + 1;   // +1 float: conflict-free transposed stores
static_assert(BM == BN && THREADS == 16 * 16 && BM == 16 * TM && BN == 16 * TN, "tile geometry");

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float group16_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, 16));
  return v;
}
__device__ __forceinline__ float group16_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, 16);
  return v;
}

// *out += the sum of v over the block's THREADS threads (one atomicAdd per block). Every thread of the
// block must call it.
__device__ __forceinline__ void block_sum_add(float v, float* out) {
  __shared__ float partial[THREADS / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < THREADS / 32; ++w) total += partial[w];
    atomicAdd(out, total);
  }
}

// dst[k][r] = src[r0 + r][k0 + k] for a BM x BK slab of a row-major (rows x d) matrix, 0 outside.
template <typename T>
__device__ __forceinline__ void load_slab(const T* __restrict__ src, int64_t rows, int64_t d, int64_t r0, int64_t k0,
                                          float* dst) {
  for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
    const int r = e / BK, k = e % BK;  // consecutive threads read consecutive k of a row: coalesced
    const int64_t gr = r0 + r, gk = k0 + k;
    dst[k * PAD + r] = (gr < rows && gk < d) ? to_float(src[gr * d + gk]) : 0.0f;
  }
}

// acc[i][j] = sum_k A[i0 + ty + 16 i][k] * B[j0 + tx + 16 j][k] (A has a_rows rows, B b_rows).
template <typename TA, typename TB>
__device__ __forceinline__ void tile_product(const TA* __restrict__ A, int64_t a_rows, const TB* __restrict__ B,
                                             int64_t b_rows, int64_t d, int64_t i0, int64_t j0, float* As, float* Bs,
                                             float (&acc)[TM][TN]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    __syncthreads();  // earlier readers of the slabs are done
    load_slab(A, a_rows, d, i0, k0, As);
    load_slab(B, b_rows, d, j0, k0, Bs);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[k * PAD + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[k * PAD + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
}

// lse_out[i] = logsumexp_j scale * A[i] . B[j] over all n rows of B, online over BN-row tiles.
template <typename T>
__global__ void __launch_bounds__(THREADS) lse_rows_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t n,
                                                           int64_t d, const float* __restrict__ scale_ptr,
                                                           float* __restrict__ lse_out) {
  __shared__ float As[BK * PAD], Bs[BK * PAD];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const float scale = *scale_ptr;
  float m[TM], z[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) { m[i] = neg_inf(); z[i] = 0.0f; }
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    float acc[TM][TN];
    tile_product(A, n, B, n, d, i0, j0, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      float x[TN], tmax = neg_inf();
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        x[j] = (j0 + tx + 16 * j < n) ? scale * acc[i][j] : neg_inf();
        tmax = fmaxf(tmax, x[j]);
      }
      const float m_new = fmaxf(m[i], group16_max(tmax));  // column j0 is valid: finite
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < TN; ++j) part += expf(x[j] - m_new);
      z[i] = z[i] * expf(m[i] - m_new) + group16_sum(part);
      m[i] = m_new;
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = i0 + ty + 16 * i;
      if (row < n) lse_out[row] = m[i] + logf(z[i]);
    }
  }
}

// grad[i] += scale * sum_j G[i, j] B[j] with G[i, j] = coef * (exp(L[i,j] - lse_self[i]) + exp(L[i,j] - lse_other[j])),
// L = scale * A @ B.T; *grad_scale += sum G * (A @ B.T) when grad_scale is not null. grad is fp32 (n x d).
template <typename T>
__global__ void __launch_bounds__(THREADS) grad_rows_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t n,
                                                            int64_t d, const float* __restrict__ scale_ptr,
                                                            const float* __restrict__ lse_self,
                                                            const float* __restrict__ lse_other,
                                                            const float* __restrict__ coef_ptr, float* __restrict__ grad,
                                                            float* __restrict__ grad_scale) {
  __shared__ float slabs[BN * PAD];  // phase 1: the two BK x PAD slabs; phase 2: B[j0:j0+BN, d0:d0+DC]
  __shared__ float Gs[BM * (BN + 1)];
  static_assert(2 * BK * PAD <= BN * PAD && DC <= PAD, "shared-memory layout");
  float* As = slabs;
  float* Bs = slabs + BK * PAD;
  float* Bd = slabs;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const float scale = *scale_ptr, coef = *coef_ptr;
  float r[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = i0 + ty + 16 * i;
    r[i] = row < n ? lse_self[row] : 0.0f;
  }
  float ds = 0.0f;
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    float acc[TM][TN];
    tile_product(A, n, B, n, d, i0, j0, As, Bs, acc);
    float q[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = j0 + tx + 16 * j;
      q[j] = col < n ? lse_other[col] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const bool row_ok = i0 + ty + 16 * i < n;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const bool ok = row_ok && (j0 + tx + 16 * j < n);
        const float x = scale * acc[i][j];
        const float g = ok ? coef * (expf(x - r[i]) + expf(x - q[j])) : 0.0f;
        ds = fmaf(g, acc[i][j], ds);
        Gs[(ty + 16 * i) * (BN + 1) + tx + 16 * j] = scale * g;
      }
    }
    for (int64_t d0 = 0; d0 < d; d0 += DC) {
      __syncthreads();  // slabs free (and, on the first pass, Gs complete)
      for (int e = threadIdx.x; e < BN * DC; e += THREADS) {
        const int rr = e / DC, c = e % DC;
        const int64_t gr = j0 + rr, gc = d0 + c;
        Bd[rr * PAD + c] = (gr < n && gc < d) ? to_float(B[gr * d + gc]) : 0.0f;
      }
      __syncthreads();
      float out[TM][TN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) out[i][j] = 0.0f;
#pragma unroll 8
      for (int k = 0; k < BN; ++k) {
        float g[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) g[i] = Gs[(ty + 16 * i) * (BN + 1) + k];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bd[k * PAD + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) out[i][j] = fmaf(g[i], b[j], out[i][j]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t row = i0 + ty + 16 * i;
        if (row >= n) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int64_t col = d0 + tx + 16 * j;
          if (col < d) grad[row * d + col] += out[i][j];  // this block owns these rows
        }
      }
    }
    __syncthreads();  // Gs is rewritten by the next tile
  }
  if (grad_scale != nullptr) block_sum_add(ds, grad_scale);
}

// Running top-k per query (sorted by score desc, index asc; empty slots (-inf, -1)) updated with the
// rows of one chunk. A block owns BM queries; candidates are visited in increasing index, so a
// strictly greater score is needed to enter and equal scores keep the lower index first.
template <typename T>
__global__ void __launch_bounds__(THREADS) topk_kernel(const float* __restrict__ Q, int64_t n, int64_t d,
                                                       const T* __restrict__ M, int64_t rows, int64_t offset,
                                                       int64_t k, float* __restrict__ best_s,
                                                       int64_t* __restrict__ best_i) {
  __shared__ float As[BK * PAD], Bs[BK * PAD];
  __shared__ float Ss[BM * (BN + 1)];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  for (int64_t j0 = 0; j0 < rows; j0 += BN) {
    float acc[TM][TN];
    tile_product(Q, n, M, rows, d, i0, j0, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        Ss[(ty + 16 * i) * (BN + 1) + tx + 16 * j] = (j0 + tx + 16 * j < rows) ? acc[i][j] : neg_inf();
    __syncthreads();
    for (int rr = warp; rr < BM; rr += THREADS / 32) {
      const int64_t row = i0 + rr;
      if (row >= n) break;
      float* bs = best_s + row * k;
      int64_t* bi = best_i + row * k;
      const float v0 = Ss[rr * (BN + 1) + lane], v1 = Ss[rr * (BN + 1) + 32 + lane];
      const float threshold = bs[k - 1];
      const unsigned m0 = __ballot_sync(0xffffffffu, v0 > threshold);
      const unsigned m1 = __ballot_sync(0xffffffffu, v1 > threshold);
      if (lane == 0 && (m0 | m1)) {
        for (int half = 0; half < 2; ++half) {
          unsigned bits = half == 0 ? m0 : m1;
          while (bits) {
            const int c = __ffs(bits) - 1 + 32 * half;
            bits &= bits - 1;
            const float v = Ss[rr * (BN + 1) + c];
            if (!(v > bs[k - 1])) continue;
            int64_t pos = k - 1;
            while (pos > 0 && v > bs[pos - 1]) {
              bs[pos] = bs[pos - 1];
              bi[pos] = bi[pos - 1];
              --pos;
            }
            bs[pos] = v;
            bi[pos] = offset + j0 + c;
          }
        }
      }
      __syncwarp();
    }
    __syncthreads();  // Ss is rewritten by the next tile
  }
}

// Running top-k update from a ready score tile (the tensor-core path: the scores come from a cuBLAS
// GEMM). One warp per query row scans its ``rows`` scores 128 at a time; only scores above the
// current k-th best reach lane 0, which inserts them in index order (ties keep the lower index), so
// after the first tiles almost every step is four coalesced loads and four ballots.
__global__ void __launch_bounds__(THREADS) topk_scores_kernel(const float* __restrict__ S, int64_t n, int64_t rows,
                                                              int64_t ld, int64_t offset, int64_t k,
                                                              float* __restrict__ best_s,
                                                              int64_t* __restrict__ best_i) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  if (row >= n) return;  // the whole warp leaves together
  const float* s = S + row * ld;
  float* bs = best_s + row * k;
  int64_t* bi = best_i + row * k;
  float threshold = bs[k - 1];
  for (int64_t c0 = 0; c0 < rows; c0 += 128) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t c = c0 + 32 * u + lane;
      v[u] = c < rows ? __ldg(s + c) : neg_inf();
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      unsigned bits = __ballot_sync(0xffffffffu, v[u] > threshold);
      if (bits == 0u) continue;  // warp-uniform
      if (lane == 0) {
        while (bits) {
          const int l = __ffs(bits) - 1;
          bits &= bits - 1;
          const int64_t c = c0 + 32 * u + l;
          const float x = s[c];
          if (!(x > bs[k - 1])) continue;
          int64_t pos = k - 1;
          while (pos > 0 && x > bs[pos - 1]) {
            bs[pos] = bs[pos - 1];
            bi[pos] = bi[pos - 1];
            --pos;
          }
          bs[pos] = x;
          bi[pos] = offset + c;
        }
      }
      __syncwarp();
      threshold = bs[k - 1];
    }
  }
}

// out[i, :] = softmax_j(scale * F[i] . P[j]): scores straight into out, then a warp per row.
__global__ void __launch_bounds__(THREADS) prototype_kernel(const float* __restrict__ F, int64_t n, int64_t d,
                                                            const float* __restrict__ P, int64_t k, float scale,
                                                            float* __restrict__ out) {
  __shared__ float As[BK * PAD], Bs[BK * PAD];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  for (int64_t j0 = 0; j0 < k; j0 += BN) {
    float acc[TM][TN];
    tile_product(F, n, P, k, d, i0, j0, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = i0 + ty + 16 * i;
      if (row >= n) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t col = j0 + tx + 16 * j;
        if (col < k) out[row * k + col] = scale * acc[i][j];
      }
    }
  }
  __syncthreads();  // the block's score writes are visible to its own threads
  for (int rr = warp; rr < BM; rr += THREADS / 32) {
    const int64_t row = i0 + rr;
    if (row >= n) break;
    float* o = out + row * k;
    float mx = neg_inf();
    for (int64_t j = lane; j < k; j += 32) mx = fmaxf(mx, o[j]);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, s));
    float z = 0.0f;
    for (int64_t j = lane; j < k; j += 32) {
      const float e = expf(o[j] - mx);
      o[j] = e;
      z += e;
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) z += __shfl_xor_sync(0xffffffffu, z, s);
    const float inv = 1.0f / z;
    __syncwarp();
    for (int64_t j = lane; j < k; j += 32) o[j] *= inv;
  }
}

// ---------------------------------------------------------------------------------------------
// Tile epilogues of the tensor-core path (ops/blocked.py): the tile X (rows x m, leading dimension
// ld, fp32 raw dot products) comes from a cuBLAS GEMM; these kernels read it once per use, fold the
// logit scale in, and keep every statistic in fp32.

// Merge two online log-sum-exp states (max m, sum z of exp(x - m)); an empty state is (-inf, 0).
__device__ __forceinline__ void lse_merge(float& m, float& z, float m2, float z2) {
  if (m2 == neg_inf()) return;
  if (m == neg_inf()) { m = m2; z = z2; return; }
  const float mn = fmaxf(m, m2);
  z = z * expf(m - mn) + z2 * expf(m2 - mn);
  m = mn;
}

// lse_out[i] = logsumexp_j scale * X[i, j]: one warp per row.
__global__ void __launch_bounds__(THREADS) tile_row_lse_kernel(const float* __restrict__ X, int64_t rows, int64_t m,
                                                               int64_t ld, const float* __restrict__ scale_ptr,
                                                               float* __restrict__ lse_out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const float scale = *scale_ptr;
  const float* x = X + row * ld;
  float mx = neg_inf(), z = 0.0f;
  for (int64_t j = lane; j < m; j += 32) {
    const float v = scale * __ldg(x + j);
    if (v > mx) { z = z * expf(mx - v) + 1.0f; mx = v; } else { z += expf(v - mx); }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, mx, o), z2 = __shfl_xor_sync(0xffffffffu, z, o);
    lse_merge(mx, z, m2, z2);
  }
  if (lane == 0) lse_out[row] = mx + logf(z);
}

constexpr int COL_SEG = 64;  // rows per column segment

// Column partial statistics of segment blockIdx.y (COL_SEG rows): part_m/part_z[seg * m + j].
__global__ void __launch_bounds__(THREADS) tile_col_partial_kernel(const float* __restrict__ X, int64_t rows,
                                                                   int64_t m, int64_t ld,
                                                                   const float* __restrict__ scale_ptr,
                                                                   float* __restrict__ part_m,
                                                                   float* __restrict__ part_z) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (j >= m) return;
  const float scale = *scale_ptr;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * COL_SEG;
  const int64_t r1 = r0 + COL_SEG < rows ? r0 + COL_SEG : rows;
  float mx = neg_inf(), z = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float v = scale * __ldg(X + r * ld + j);
    if (v > mx) { z = z * expf(mx - v) + 1.0f; mx = v; } else { z += expf(v - mx); }
  }
  part_m[blockIdx.y * m + j] = mx;
  part_z[blockIdx.y * m + j] = z;
}

// lse_col[j] = logaddexp(lse_col[j], logsumexp over the segments' partials of column j).
__global__ void __launch_bounds__(THREADS) tile_col_merge_kernel(const float* __restrict__ part_m,
                                                                 const float* __restrict__ part_z, int64_t segs,
                                                                 int64_t m, float* __restrict__ lse_col) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (j >= m) return;
  float mx = lse_col[j], z = mx == neg_inf() ? 0.0f : 1.0f;
  for (int64_t s = 0; s < segs; ++s) lse_merge(mx, z, part_m[s * m + j], part_z[s * m + j]);
  lse_col[j] = mx + logf(z);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// G[i, j] = crow_i * exp(s X[i,j] - lse_row[i]) + coef * exp(s X[i,j] - lse_col[j]) (second term only when
// lse_col is given; crow_i = row_coef[i], or coef when row_coef is null), written as T; *grad_scale += sum G * X.
// Grid: (column blocks of THREADS * 4, rows).
template <typename T>
__global__ void __launch_bounds__(THREADS) tile_grad_kernel(const float* __restrict__ X, int64_t m, int64_t ld,
                                                            const float* __restrict__ scale_ptr,
                                                            const float* __restrict__ lse_row,
                                                            const float* __restrict__ lse_col,
                                                            const float* __restrict__ row_coef,
                                                            const float* __restrict__ coef_ptr, T* __restrict__ G,
                                                            int64_t ldg, float* __restrict__ grad_scale) {
  const int64_t i = blockIdx.y;
  const float scale = *scale_ptr, coef = *coef_ptr;
  const float r = lse_row[i];
  const float crow = row_coef != nullptr ? row_coef[i] : coef;
  const float* x = X + i * ld;
  T* g = G + i * ldg;
  float ds = 0.0f;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * THREADS * 4 + threadIdx.x;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t j = j0 + u * THREADS;
    if (j < m) {
      const float raw = __ldg(x + j), v = scale * raw;
      float gv = crow * expf(v - r);
      if (lse_col != nullptr) gv += coef * expf(v - lse_col[j]);
      g[j] = from_float<T>(gv);
      ds = fmaf(gv, raw, ds);
    }
  }
  block_sum_add(ds, grad_scale);
}

// ---------------------------------------------------------------------------------------------
// Host side.

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T> const T* ptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T> T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

unsigned blocks_for(int64_t rows) {
  const int64_t b = (rows + BM - 1) / BM;
  if (b > 0x7fffffff) throw std::invalid_argument("too many rows for one launch");
  return static_cast<unsigned>(b);
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

template <typename T>
void loss_forward_typed(uintptr_t a, uintptr_t b, int64_t n, int64_t d, uintptr_t scale, uintptr_t lse_row,
                        uintptr_t lse_col, cudaStream_t stream) {
  lse_rows_kernel<T><<<blocks_for(n), THREADS, 0, stream>>>(ptr<T>(a), ptr<T>(b), n, d, ptr<float>(scale),
                                                             mptr<float>(lse_row));
  check_launch("lse_rows_kernel (rows)");
  lse_rows_kernel<T><<<blocks_for(n), THREADS, 0, stream>>>(ptr<T>(b), ptr<T>(a), n, d, ptr<float>(scale),
                                                             mptr<float>(lse_col));
  check_launch("lse_rows_kernel (columns)");
}

template <typename T>
void loss_backward_typed(uintptr_t a, uintptr_t b, int64_t n, int64_t d, uintptr_t scale, uintptr_t lse_row,
                         uintptr_t lse_col, uintptr_t coef, uintptr_t grad_a, uintptr_t grad_b, uintptr_t grad_scale,
                         cudaStream_t stream) {
  grad_rows_kernel<T><<<blocks_for(n), THREADS, 0, stream>>>(ptr<T>(a), ptr<T>(b), n, d, ptr<float>(scale),
                                                              ptr<float>(lse_row), ptr<float>(lse_col),
                                                              ptr<float>(coef), mptr<float>(grad_a),
                                                              mptr<float>(grad_scale));
  check_launch("grad_rows_kernel (A)");
  grad_rows_kernel<T><<<blocks_for(n), THREADS, 0, stream>>>(ptr<T>(b), ptr<T>(a), n, d, ptr<float>(scale),
                                                              ptr<float>(lse_col), ptr<float>(lse_row),
                                                              ptr<float>(coef), mptr<float>(grad_b), nullptr);
  check_launch("grad_rows_kernel (B)");
}

}  // namespace

void register_similarity(py::module_& m) {
  m.def(
      "trimodal_loss_forward",
      [](uintptr_t a, uintptr_t b, int64_t n, int64_t d, int dtype, uintptr_t scale, uintptr_t lse_row,
         uintptr_t lse_col, uintptr_t stream, int device) {
        require(n >= 1 && d >= 1, "trimodal_loss_forward: empty input");
        check(cudaSetDevice(device), "cudaSetDevice");
        auto s = reinterpret_cast<cudaStream_t>(stream);
        switch (dtype) {
          case kF32: loss_forward_typed<float>(a, b, n, d, scale, lse_row, lse_col, s); break;
          case kBF16: loss_forward_typed<__nv_bfloat16>(a, b, n, d, scale, lse_row, lse_col, s); break;
          case kF16: loss_forward_typed<__half>(a, b, n, d, scale, lse_row, lse_col, s); break;
          default: throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
        }
      },
      py::arg("a"), py::arg("b"), py::arg("n"), py::arg("d"), py::arg("dtype"), py::arg("scale"), py::arg("lse_row"),
      py::arg("lse_col"), py::arg("stream"), py::arg("device"),
      "Row and column log-sum-exp (fp32) of scale * a @ b.T for device pointers; scale is a device fp32 scalar.");
  m.def(
      "trimodal_loss_backward",
      [](uintptr_t a, uintptr_t b, int64_t n, int64_t d, int dtype, uintptr_t scale, uintptr_t lse_row,
         uintptr_t lse_col, uintptr_t coef, uintptr_t grad_a, uintptr_t grad_b, uintptr_t grad_scale, uintptr_t stream,
         int device) {
        require(n >= 1 && d >= 1, "trimodal_loss_backward: empty input");
        check(cudaSetDevice(device), "cudaSetDevice");
        auto s = reinterpret_cast<cudaStream_t>(stream);
        switch (dtype) {
          case kF32:
            loss_backward_typed<float>(a, b, n, d, scale, lse_row, lse_col, coef, grad_a, grad_b, grad_scale, s);
            break;
          case kBF16:
            loss_backward_typed<__nv_bfloat16>(a, b, n, d, scale, lse_row, lse_col, coef, grad_a, grad_b, grad_scale,
                                               s);
            break;
          case kF16:
            loss_backward_typed<__half>(a, b, n, d, scale, lse_row, lse_col, coef, grad_a, grad_b, grad_scale, s);
            break;
          default: throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
        }
      },
      py::arg("a"), py::arg("b"), py::arg("n"), py::arg("d"), py::arg("dtype"), py::arg("scale"), py::arg("lse_row"),
      py::arg("lse_col"), py::arg("coef"), py::arg("grad_a"), py::arg("grad_b"), py::arg("grad_scale"),
      py::arg("stream"), py::arg("device"),
      "fp32 gradients of coef * (sum lse_row + sum lse_col) added into grad_a, grad_b; adds the scale "
      "gradient to *grad_scale.");
  m.def(
      "topk_update",
      [](uintptr_t queries, int64_t n, int64_t d, uintptr_t chunk, int64_t rows, bool chunk_is_fp16, int64_t offset,
         int64_t k, uintptr_t best_score, uintptr_t best_index, uintptr_t stream, int device) {
        require(n >= 1 && d >= 1 && k >= 1, "topk_update: empty input");
        if (rows == 0) return;
        check(cudaSetDevice(device), "cudaSetDevice");
        auto s = reinterpret_cast<cudaStream_t>(stream);
        if (chunk_is_fp16)
          topk_kernel<__half><<<blocks_for(n), THREADS, 0, s>>>(ptr<float>(queries), n, d, ptr<__half>(chunk), rows,
                                                                 offset, k, mptr<float>(best_score),
                                                                 mptr<int64_t>(best_index));
        else
          topk_kernel<float><<<blocks_for(n), THREADS, 0, s>>>(ptr<float>(queries), n, d, ptr<float>(chunk), rows,
                                                                offset, k, mptr<float>(best_score),
                                                                mptr<int64_t>(best_index));
        check_launch("topk_kernel");
      },
      py::arg("queries"), py::arg("n"), py::arg("d"), py::arg("chunk"), py::arg("rows"), py::arg("chunk_is_fp16"),
      py::arg("offset"), py::arg("k"), py::arg("best_score"), py::arg("best_index"), py::arg("stream"),
      py::arg("device"), "Stream one chunk (fp32 or fp16 rows) into each query's running top-k.");
  m.def(
      "topk_scores_update",
      [](uintptr_t scores, int64_t n, int64_t rows, int64_t ld, int64_t offset, int64_t k, uintptr_t best_score,
         uintptr_t best_index, uintptr_t stream, int device) {
        require(n >= 1 && k >= 1 && ld >= rows, "topk_scores_update: bad shape");
        if (rows == 0) return;
        check(cudaSetDevice(device), "cudaSetDevice");
        const int64_t blocks = (n + THREADS / 32 - 1) / (THREADS / 32);
        require(blocks <= 0x7fffffff, "topk_scores_update: too many queries for one launch");
        topk_scores_kernel<<<static_cast<unsigned>(blocks), THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            ptr<float>(scores), n, rows, ld, offset, k, mptr<float>(best_score), mptr<int64_t>(best_index));
        check_launch("topk_scores_kernel");
      },
      py::arg("scores"), py::arg("n"), py::arg("rows"), py::arg("ld"), py::arg("offset"), py::arg("k"),
      py::arg("best_score"), py::arg("best_index"), py::arg("stream"), py::arg("device"),
      "Stream an fp32 score tile (n x rows, leading dimension ld; column r is row offset + r) into each query's "
      "running top-k (score desc, index asc).");
  m.def(
      "tile_row_lse",
      [](uintptr_t x, int64_t rows, int64_t m, int64_t ld, uintptr_t scale, uintptr_t lse_out, uintptr_t stream,
         int device) {
        require(rows >= 0 && m >= 1 && ld >= m, "tile_row_lse: bad shape");
        if (rows == 0) return;
        check(cudaSetDevice(device), "cudaSetDevice");
        const int64_t blocks = (rows + THREADS / 32 - 1) / (THREADS / 32);
        tile_row_lse_kernel<<<static_cast<unsigned>(blocks), THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            ptr<float>(x), rows, m, ld, ptr<float>(scale), mptr<float>(lse_out));
        check_launch("tile_row_lse_kernel");
      },
      py::arg("x"), py::arg("rows"), py::arg("m"), py::arg("ld"), py::arg("scale"), py::arg("lse_out"),
      py::arg("stream"), py::arg("device"), "lse_out[i] = logsumexp_j scale * x[i, j] for an fp32 tile (rows x m).");
  m.def(
      "tile_col_lse_update",
      [](uintptr_t x, int64_t rows, int64_t m, int64_t ld, uintptr_t scale, uintptr_t lse_col, uintptr_t part_m,
         uintptr_t part_z, uintptr_t stream, int device) {
        require(rows >= 0 && m >= 1 && ld >= m, "tile_col_lse_update: bad shape");
        if (rows == 0) return;
        check(cudaSetDevice(device), "cudaSetDevice");
        auto s = reinterpret_cast<cudaStream_t>(stream);
        const int64_t segs = (rows + COL_SEG - 1) / COL_SEG;
        require(segs <= 65535, "tile_col_lse_update: too many rows in one tile");
        const dim3 grid(static_cast<unsigned>((m + THREADS - 1) / THREADS), static_cast<unsigned>(segs));
        tile_col_partial_kernel<<<grid, THREADS, 0, s>>>(ptr<float>(x), rows, m, ld, ptr<float>(scale),
                                                         mptr<float>(part_m), mptr<float>(part_z));
        check_launch("tile_col_partial_kernel");
        tile_col_merge_kernel<<<static_cast<unsigned>((m + THREADS - 1) / THREADS), THREADS, 0, s>>>(
            ptr<float>(part_m), ptr<float>(part_z), segs, m, mptr<float>(lse_col));
        check_launch("tile_col_merge_kernel");
      },
      py::arg("x"), py::arg("rows"), py::arg("m"), py::arg("ld"), py::arg("scale"), py::arg("lse_col"),
      py::arg("part_m"), py::arg("part_z"), py::arg("stream"), py::arg("device"),
      "lse_col[j] = logaddexp(lse_col[j], logsumexp_i scale * x[i, j]); part_m/part_z: scratch of "
      "ceil(rows / 64) * m floats each.");
  m.def(
      "tile_grad",
      [](uintptr_t x, int64_t rows, int64_t m, int64_t ld, uintptr_t scale, uintptr_t lse_row, uintptr_t lse_col,
         uintptr_t row_coef, uintptr_t coef, uintptr_t g, int64_t ldg, int g_dtype, uintptr_t grad_scale,
         uintptr_t stream, int device) {
        require(rows >= 0 && m >= 1 && ld >= m && ldg >= m, "tile_grad: bad shape");
        require(rows <= 65535, "tile_grad: at most 65535 rows per tile");
        if (rows == 0) return;
        check(cudaSetDevice(device), "cudaSetDevice");
        auto s = reinterpret_cast<cudaStream_t>(stream);
        const dim3 grid(static_cast<unsigned>((m + THREADS * 4 - 1) / (THREADS * 4)), static_cast<unsigned>(rows));
        const float* lc = lse_col ? ptr<float>(lse_col) : nullptr;
        const float* rc = row_coef ? ptr<float>(row_coef) : nullptr;
        switch (g_dtype) {
          case kF32:
            tile_grad_kernel<float><<<grid, THREADS, 0, s>>>(ptr<float>(x), m, ld, ptr<float>(scale), ptr<float>(lse_row),
                                                             lc, rc, ptr<float>(coef), mptr<float>(g), ldg,
                                                             mptr<float>(grad_scale));
            break;
          case kBF16:
            tile_grad_kernel<__nv_bfloat16><<<grid, THREADS, 0, s>>>(
                ptr<float>(x), m, ld, ptr<float>(scale), ptr<float>(lse_row), lc, rc, ptr<float>(coef),
                mptr<__nv_bfloat16>(g), ldg, mptr<float>(grad_scale));
            break;
          case kF16:
            tile_grad_kernel<__half><<<grid, THREADS, 0, s>>>(ptr<float>(x), m, ld, ptr<float>(scale),
                                                              ptr<float>(lse_row), lc, rc, ptr<float>(coef),
                                                              mptr<__half>(g), ldg, mptr<float>(grad_scale));
            break;
          default: throw std::invalid_argument("g_dtype must be 0 (fp32), 1 (bf16) or 2 (fp16)");
        }
        check_launch("tile_grad_kernel");
      },
      py::arg("x"), py::arg("rows"), py::arg("m"), py::arg("ld"), py::arg("scale"), py::arg("lse_row"),
      py::arg("lse_col"), py::arg("row_coef"), py::arg("coef"), py::arg("g"), py::arg("ldg"), py::arg("g_dtype"),
      py::arg("grad_scale"), py::arg("stream"), py::arg("device"),
      "g = row_coef_i (or coef) * exp(scale x - lse_row_i) [+ coef * exp(scale x - lse_col_j)] for an fp32 tile, "
      "written as fp32/bf16/fp16; *grad_scale += sum g * x. Null pointers (0) omit lse_col / row_coef.");
  m.def(
      "prototype_probs",
      [](uintptr_t features, int64_t n, int64_t d, uintptr_t prototypes, int64_t k, float scale, uintptr_t out,
         uintptr_t stream, int device) {
        require(d >= 1 && k >= 1, "prototype_probs: empty input");
        if (n == 0) return;
        check(cudaSetDevice(device), "cudaSetDevice");
        prototype_kernel<<<blocks_for(n), THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            ptr<float>(features), n, d, ptr<float>(prototypes), k, scale, mptr<float>(out));
        check_launch("prototype_kernel");
      },
      py::arg("features"), py::arg("n"), py::arg("d"), py::arg("prototypes"), py::arg("k"), py::arg("scale"),
      py::arg("out"), py::arg("stream"), py::arg("device"), "out (n x k, fp32) = softmax over prototypes of scale * F @ P.T.");
}

}  // namespace galaxalign_cuda
