// Entry points of the torch-free kernels: raw pointers and plain types only, so the CPU kernels and the
// CUDA kernels (compiled by plain nvcc) never see a torch header. csrc/binding.cpp is the only torch code.
#pragma once

#include <cstdint>

#include "geffect/math.h"

namespace geffect {

// Rows of logits with their targets. Row r of the logits starts at logits + r * logits_stride and
// holds `vocab` contiguous values; rows whose label is ignore_index contribute 0 and a zero gradient.
// `grad` (row stride grad_stride) receives ∂/∂logits when non-null; it may equal `logits` (in place).
template <typename T>
struct RowBatch {
  const T* logits;
  int64_t logits_stride;
  T* grad;
  int64_t grad_stride;
  const int64_t* labels;
  int64_t ignore_index;
  int64_t rows;
  int64_t vocab;
  double softcap;  // <= 0: none
};

namespace cpu {

// ℓ_r and logsumexp of each row (both 0 for ignored rows).
template <typename T>
void row_logprobs(const RowBatch<T>& b, T* logprobs, T* lse);

// grad_r = coef_r · (onehot(y_r) − softmax(z_r)) · dz/dx, from a known lse.
template <typename T>
void row_grad(const RowBatch<T>& b, const T* lse, const T* coef);

// Fused token loss: ℓ_r, coef_r = scale · w(ℓ_r, ref_r) (0 for ignored rows), and the gradient of
// Σ coef·ℓ written to b.grad in the same call. `ref` may be null when the weighting needs none.
template <typename T>
void row_weighted_loss(const RowBatch<T>& b, const T* ref, const WeightParams& w, double scale,
                       T* logprobs, T* coef);

// kl_r = KL(softmax(ref_r) ‖ softmax(z_r)) per row (0 for ignored rows); b.grad gets scale · (p − q) · dz/dx.
template <typename T>
void row_kl(const RowBatch<T>& b, const T* ref_logits, int64_t ref_stride, double scale, T* kl);

// ce_r = −Σ_v t_v log softmax(z_r)_v, t = softmax(target_r − β·onehot(y_r)) detached (0 for ignored rows);
// target_logits null: the row's own logits with the label's at −∞ (CE-U; β unused). b.grad gets scale · (p − t) ·
// dz/dx, written under CE-U as p_y at the label and −exp(z_v − LSE_{v≠y} + ℓ_y) elsewhere.
template <typename T>
void row_target_ce(const RowBatch<T>& b, const T* target_logits, int64_t target_stride, double beta, double scale,
                   T* ce);

// token_stats per row: ℓ_r, the entropy of softmax(z_r) and Var_{softmax(z_r)}[log softmax(z_r)] (all 0 for
// ignored rows). b.grad is not used.
template <typename T>
void row_token_stats(const RowBatch<T>& b, T* logprobs, T* entropy, T* variance);

// row_sums[i] += Σ_j a[i, j] · b[i, j] in float64, both [rows, cols] with row stride ld.
template <typename T>
void rowwise_dot(const T* a, const T* b, int64_t rows, int64_t cols, int64_t ld, double* row_sums);

}  // namespace cpu

namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The CUDA row kernels take logits/grad in `dtype` and per-row vectors in the compute type
// (double for kFloat64, float otherwise). `stream` is a cudaStream_t.
struct RowBatchAny {
  const void* logits;
  int64_t logits_stride;
  void* grad;
  int64_t grad_stride;
  const int64_t* labels;
  int64_t ignore_index;
  int64_t rows;
  int64_t vocab;
  double softcap;
  DType dtype;
  void* stream;
};

// `scale` (the loss's 1/n_valid) is one double in device memory, read by the kernels: the host never waits for it.
void row_logprobs(const RowBatchAny& b, void* logprobs, void* lse);
void row_grad(const RowBatchAny& b, const void* lse, const void* coef);
void row_weighted_loss(const RowBatchAny& b, const void* ref, const WeightParams& w, const double* scale,
                       void* logprobs, void* coef);
void row_kl(const RowBatchAny& b, const void* ref_logits, int64_t ref_stride, const double* scale, void* kl);
void row_target_ce(const RowBatchAny& b, const void* target_logits, int64_t target_stride, double beta,
                   const double* scale, void* ce);
void row_token_stats(const RowBatchAny& b, void* logprobs, void* entropy, void* variance);

// Σ_{i,j} (ga gbᵀ)_ij (xa xbᵀ)_ij without forming either Gram matrix. With segment_ids (int64 [na]) the
// sum over j and over the i of each segment goes to out[segment]; without, everything goes to out[0].
// `out` (float64, zeroed by the caller) must hold num_segments values (1 without segments).
struct GhostArgs {
  const void* grad_a;
  const void* input_a;
  const void* grad_b;
  const void* input_b;
  int64_t na, nb, d_out, d_in;
  const int64_t* segment_ids;
  double* out;
  DType dtype;
  void* stream;
};

void ghost_inner_product(const GhostArgs& args);

}  // namespace cuda
}  // namespace geffect
