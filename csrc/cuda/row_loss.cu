// CUDA row kernels for the logits-input token losses: one 1024-thread block per row. The LSE sweep
// reads the row with 16-byte loads and an online update per vector; the gradient sweep re-reads it
// and writes the gradient (in place if asked). About one such block fits an SM, so the rows in flight
// (132 × 256 KiB at V = 128k, bf16) stay within L2 and the second read is served from there.
#include <cmath>

#include "common.cuh"

namespace geffect::cuda {
namespace {

constexpr int kThreads = 1024;

enum class Op { kLogprobs, kGrad, kWeighted };

// Adds `count` soft-capped values to a thread's running LSE: one rescale per vector, not per element.
template <typename T, typename C>
__device__ __forceinline__ void lse_add(Lse<C>& acc, const C* values, int count, C softcap) {
  C z[16 / sizeof(T)];
  C m = -INFINITY, unused;
  for (int k = 0; k < count; ++k) {
    z[k] = softcapped(values[k], softcap, &unused);
    m = z[k] > m ? z[k] : m;
  }
  if (m > acc.max) {
    acc.sum *= Storage<T>::exp(acc.max - m);
    acc.max = m;
  }
  for (int k = 0; k < count; ++k) acc.sum += Storage<T>::exp(z[k] - acc.max);
}

// Adds `count` already soft-capped values (−∞ allowed) to a thread's running LSE.
template <typename T, typename C>
__device__ __forceinline__ void lse_add_capped(Lse<C>& acc, const C* z, int count) {
  C m = -INFINITY;
  for (int k = 0; k < count; ++k) m = z[k] > m ? z[k] : m;
  if (m == C(-INFINITY)) return;  // nothing to add (CE-U's label alone), and exp(−∞ − −∞) would be NaN
  if (m > acc.max) {
    acc.sum *= Storage<T>::exp(acc.max - m);
    acc.max = m;
  }
  for (int k = 0; k < count; ++k) acc.sum += Storage<T>::exp(z[k] - acc.max);
}

template <typename T, typename C>
__device__ C row_lse(const T* row, int64_t vocab, C softcap) {
  Lse<C> acc{C(-INFINITY), C(0)};
  visit_row(row, vocab, [&](int64_t, const C* v, int count) { lse_add<T>(acc, v, count, softcap); });
  return block_lse(acc).value();
}

template <typename T>
__device__ void zero_row(T* row, int64_t vocab) {
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) row[i] = Storage<T>::store(0.0f);
}

template <typename T, Op op>
__global__ void __launch_bounds__(kThreads)
row_kernel(RowBatchAny b, const typename Storage<T>::C* lse_in, const typename Storage<T>::C* coef_in,
           const typename Storage<T>::C* ref, WeightParams w, const double* scale, typename Storage<T>::C* logprobs_out,
           typename Storage<T>::C* lse_out, typename Storage<T>::C* coef_out) {
  using C = typename Storage<T>::C;
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(b.logits) + r * b.logits_stride;
  T* grad = b.grad ? static_cast<T*>(b.grad) + r * b.grad_stride : nullptr;
  const int64_t label = b.labels[r];
  const C softcap = C(b.softcap);
  if (label == b.ignore_index) {
    if (threadIdx.x == 0) {
      if (logprobs_out) logprobs_out[r] = C(0);
      if (lse_out) lse_out[r] = C(0);
      if (coef_out) coef_out[r] = C(0);
    }
    if (grad) zero_row(grad, b.vocab);
    return;
  }
  C lse, coef = C(0);
  if constexpr (op == Op::kGrad) {
    lse = lse_in[r];
    coef = coef_in[r];
  } else {
    lse = row_lse(row, b.vocab, softcap);
    C unused;
    const C logprob = softcapped(Storage<T>::load(row[label]), softcap, &unused) - lse;
    if constexpr (op == Op::kWeighted) coef = C(*scale) * token_weight(w, logprob, ref ? ref[r] : C(0));
    if (threadIdx.x == 0) {
      logprobs_out[r] = logprob;
      if (lse_out) lse_out[r] = lse;
      if (coef_out) coef_out[r] = coef;
    }
    __syncthreads();  // row[label] is read by every thread before the gradient may overwrite it
  }
  if (!grad) return;
  map_row(row, grad, b.vocab, [&](int64_t i, C x) {
    C dzdx;
    const C z = softcapped(x, softcap, &dzdx);
    return coef * ((i == label ? C(1) : C(0)) - Storage<T>::exp(z - lse)) * dzdx;
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
kl_kernel(RowBatchAny b, const T* ref_logits, int64_t ref_stride, const double* scale,
          typename Storage<T>::C* kl) {
  using C = typename Storage<T>::C;
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(b.logits) + r * b.logits_stride;
  const T* ref = ref_logits + r * ref_stride;
  T* grad = b.grad ? static_cast<T*>(b.grad) + r * b.grad_stride : nullptr;
  const C softcap = C(b.softcap);
  if (b.labels[r] == b.ignore_index) {
    if (threadIdx.x == 0) kl[r] = C(0);
    if (grad) zero_row(grad, b.vocab);
    return;
  }
  const C lse_p = row_lse(row, b.vocab, softcap), lse_q = row_lse(ref, b.vocab, softcap);
  C sum = C(0);
  auto term = [&](int64_t i, C x, C* dzdx) {  // accumulates q(log q − log p); returns p − q
    C unused;
    const C log_q = softcapped(Storage<T>::load(ref[i]), softcap, &unused) - lse_q;
    const C log_p = softcapped(x, softcap, dzdx) - lse_p;
    const C q = Storage<T>::exp(log_q);
    sum += q * (log_q - log_p);
    return Storage<T>::exp(log_p) - q;
  };
  if (grad) {
    const C s = C(*scale);
    map_row(row, grad, b.vocab, [&](int64_t i, C x) {
      C dzdx;
      const C p_minus_q = term(i, x, &dzdx);
      return s * p_minus_q * dzdx;
    });
  } else {
    visit_row(row, b.vocab, [&](int64_t i, const C* v, int count) {
      C dzdx;
      for (int k = 0; k < count; ++k) term(i + k, v[k], &dzdx);
    });
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) kl[r] = sum;
}

// LSE of a target row with the label's entry lowered by β, or set to −∞ (own).
template <typename T, typename C>
__device__ C shifted_lse(const T* row, int64_t vocab, C softcap, int64_t label, C beta, bool own) {
  Lse<C> acc{C(-INFINITY), C(0)};
  visit_row(row, vocab, [&](int64_t i, const C* v, int count) {
    C z[16 / sizeof(T)];
    for (int k = 0; k < count; ++k) {
      C unused;
      z[k] = softcapped(v[k], softcap, &unused);
      if (i + k == label) z[k] = own ? C(-INFINITY) : z[k] - beta;
    }
    lse_add_capped<T>(acc, z, count);
  });
  return block_lse(acc).value();
}

// Cross-entropy to softmax(target − β·onehot(y)), or under `own` (target null) to the row's own distribution
// without the label; the gradient p − t, under `own` as p_y at the label and −exp(z_v − LSE_{v≠y} + ℓ_y) elsewhere.
template <typename T>
__global__ void __launch_bounds__(kThreads)
target_ce_kernel(RowBatchAny b, const T* target_logits, int64_t target_stride, double beta_, const double* scale,
                 typename Storage<T>::C* ce) {
  using C = typename Storage<T>::C;
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(b.logits) + r * b.logits_stride;
  const bool own = target_logits == nullptr;
  const T* target = own ? row : target_logits + r * target_stride;
  T* grad = b.grad ? static_cast<T*>(b.grad) + r * b.grad_stride : nullptr;
  const C softcap = C(b.softcap), beta = C(beta_);
  const int64_t label = b.labels[r];
  if (label == b.ignore_index) {
    if (threadIdx.x == 0) ce[r] = C(0);
    if (grad) zero_row(grad, b.vocab);
    return;
  }
  const C lse = row_lse(row, b.vocab, softcap), lse_t = shifted_lse(target, b.vocab, softcap, label, beta, own);
  C unused;
  const C logprob = softcapped(Storage<T>::load(row[label]), softcap, &unused) - lse;
  __syncthreads();  // row[label] is read by every thread before the gradient may overwrite it
  C sum = C(0);
  auto term = [&](int64_t i, C x, C* dzdx) {  // accumulates t (LSE − z); returns p − t
    const C z = softcapped(x, softcap, dzdx);
    if (own) {
      if (i == label) return Storage<T>::exp(logprob);
      const C q = Storage<T>::exp(z - lse_t);
      sum += q * (lse - z);
      return -Storage<T>::exp(z - lse_t + logprob);
    }
    C zt = softcapped(Storage<T>::load(target[i]), softcap, &unused);
    if (i == label) zt -= beta;
    const C t = Storage<T>::exp(zt - lse_t);
    sum += t * (lse - z);
    return Storage<T>::exp(z - lse) - t;
  };
  if (grad) {
    const C s = C(*scale);
    map_row(row, grad, b.vocab, [&](int64_t i, C x) {
      C dzdx;
      const C p_minus_t = term(i, x, &dzdx);
      return s * p_minus_t * dzdx;
    });
  } else {
    visit_row(row, b.vocab, [&](int64_t i, const C* v, int count) {
      C dzdx;
      for (int k = 0; k < count; ++k) term(i + k, v[k], &dzdx);
    });
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) ce[r] = sum;
}

template <Op op>
void launch_row(const RowBatchAny& b, const void* lse_in, const void* coef_in, const void* ref, const WeightParams& w,
                const double* scale, void* logprobs, void* lse, void* coef) {
  if (b.rows == 0) return;
  dispatch(b.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = typename Storage<T>::C;
    row_kernel<T, op><<<b.rows, kThreads, 0, static_cast<cudaStream_t>(b.stream)>>>(
        b, static_cast<const C*>(lse_in), static_cast<const C*>(coef_in), static_cast<const C*>(ref), w, scale,
        static_cast<C*>(logprobs), static_cast<C*>(lse), static_cast<C*>(coef));
  });
  check_launch("geffect row kernel");
}

}  // namespace

void row_logprobs(const RowBatchAny& b, void* logprobs, void* lse) {
  launch_row<Op::kLogprobs>(b, nullptr, nullptr, nullptr, WeightParams{kOne, 0, 0, 0, 0}, nullptr, logprobs, lse,
                            nullptr);
}

void row_grad(const RowBatchAny& b, const void* lse, const void* coef) {
  launch_row<Op::kGrad>(b, lse, coef, nullptr, WeightParams{kOne, 0, 0, 0, 0}, nullptr, nullptr, nullptr, nullptr);
}

void row_weighted_loss(const RowBatchAny& b, const void* ref, const WeightParams& w, const double* scale,
                       void* logprobs, void* coef) {
  launch_row<Op::kWeighted>(b, nullptr, nullptr, ref, w, scale, logprobs, nullptr, coef);
}

void row_kl(const RowBatchAny& b, const void* ref_logits, int64_t ref_stride, const double* scale, void* kl) {
  if (b.rows == 0) return;
  dispatch(b.dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_kernel<T><<<b.rows, kThreads, 0, static_cast<cudaStream_t>(b.stream)>>>(
        b, static_cast<const T*>(ref_logits), ref_stride, scale, static_cast<typename Storage<T>::C*>(kl));
  });
  check_launch("geffect KL kernel");
}

void row_target_ce(const RowBatchAny& b, const void* target_logits, int64_t target_stride, double beta,
                   const double* scale, void* ce) {
  if (b.rows == 0) return;
  dispatch(b.dtype, [&](auto tag) {
    using T = decltype(tag);
    target_ce_kernel<T><<<b.rows, kThreads, 0, static_cast<cudaStream_t>(b.stream)>>>(
        b, static_cast<const T*>(target_logits), target_stride, beta, scale,
        static_cast<typename Storage<T>::C*>(ce));
  });
  check_launch("geffect target cross-entropy kernel");
}

}  // namespace geffect::cuda
