// CPU row kernels for the logits-input token losses: OpenMP over rows, auto-vectorized loops within a
// row (see vec_exp.h). Each row is read once from memory: the LSE sweeps it a block at a time (the
// block stays in L1 between its max and its Σexp), and the gradient sweep re-reads it from L2
// (a 32k-vocabulary float row is 128 KiB) while writing the gradient, in place if asked.
#include <algorithm>
#include <limits>
#include <vector>

#include "geffect/kernels.h"
#include "vec_exp.h"

namespace geffect::cpu {
namespace {

constexpr int64_t kBlock = 1024;  // elements per LSE block

template <typename T>
Lse<T> row_lse(const T* z, int64_t vocab) {
  Lse<T> acc{-std::numeric_limits<T>::infinity(), T(0)};
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const T* zb = z + start;
    const int64_t n = std::min(kBlock, vocab - start);
    T m = zb[0];
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = zb[i] > m ? zb[i] : m;
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += vexp(zb[i] - m);
    acc = lse_merge(acc, Lse<T>{m, s});
  }
  return acc;
}

// out = coef · (onehot(label) − exp(z − lse)) · dz/dx, where dz/dx = 1 − (z/softcap)² under a soft-cap
// (z are then the capped logits). `out` may alias `z` only without a soft-cap.
template <typename T>
void write_grad(const T* z, T* out, int64_t vocab, T lse, T coef, int64_t label, T softcap) {
  const T neg = -coef;
  if (softcap > T(0)) {
    const T inv = T(1) / softcap;
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) {
      const T t = z[i] * inv;
      out[i] = neg * vexp(z[i] - lse) * (T(1) - t * t);
    }
    const T t = z[label] * inv;
    out[label] += coef * (T(1) - t * t);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) out[i] = neg * vexp(z[i] - lse);
    out[label] += coef;
  }
}

// Per-thread access to rows, soft-capped into a scratch row when a cap is set.
template <typename T>
class RowReader {
 public:
  RowReader(const T* base, int64_t stride, int64_t vocab, double softcap)
      : base_(base), stride_(stride), vocab_(vocab), softcap_(T(softcap)) {
    if (softcap_ > T(0)) scratch_.resize(vocab);
  }
  const T* operator()(int64_t row) {
    const T* x = base_ + row * stride_;
    if (softcap_ <= T(0)) return x;
    T unused;
    for (int64_t i = 0; i < vocab_; ++i) scratch_[i] = softcapped(x[i], softcap_, &unused);
    return scratch_.data();
  }
  T softcap() const { return softcap_ > T(0) ? softcap_ : T(0); }

 private:
  const T* base_;
  int64_t stride_, vocab_;
  T softcap_;
  std::vector<T> scratch_;
};

template <typename T>
bool ignored(const RowBatch<T>& b, int64_t r) {
  return b.labels[r] == b.ignore_index;
}

template <typename T>
T* grad_row(const RowBatch<T>& b, int64_t r) {
  return b.grad ? b.grad + r * b.grad_stride : nullptr;
}

template <typename T>
void zero_row(T* row, int64_t vocab) {
  if (row) std::fill(row, row + vocab, T(0));
}

}  // namespace

template <typename T>
void row_logprobs(const RowBatch<T>& b, T* logprobs, T* lse) {
#pragma omp parallel
  {
    RowReader<T> read(b.logits, b.logits_stride, b.vocab, b.softcap);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < b.rows; ++r) {
      if (ignored(b, r)) {
        logprobs[r] = lse[r] = T(0);
        continue;
      }
      const T* z = read(r);
      lse[r] = row_lse(z, b.vocab).value();
      logprobs[r] = z[b.labels[r]] - lse[r];
    }
  }
}

template <typename T>
void row_grad(const RowBatch<T>& b, const T* lse, const T* coef) {
#pragma omp parallel
  {
    RowReader<T> read(b.logits, b.logits_stride, b.vocab, b.softcap);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < b.rows; ++r) {
      if (ignored(b, r)) {
        zero_row(grad_row(b, r), b.vocab);
        continue;
      }
      write_grad(read(r), grad_row(b, r), b.vocab, lse[r], coef[r], b.labels[r], read.softcap());
    }
  }
}

template <typename T>
void row_weighted_loss(const RowBatch<T>& b, const T* ref, const WeightParams& w, double scale,
                       T* logprobs, T* coef) {
#pragma omp parallel
  {
    RowReader<T> read(b.logits, b.logits_stride, b.vocab, b.softcap);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < b.rows; ++r) {
      if (ignored(b, r)) {
        logprobs[r] = coef[r] = T(0);
        zero_row(grad_row(b, r), b.vocab);
        continue;
      }
      const T* z = read(r);
      const int64_t label = b.labels[r];
      const T lse = row_lse(z, b.vocab).value();
      logprobs[r] = z[label] - lse;
      coef[r] = T(scale) * token_weight(w, logprobs[r], ref ? ref[r] : T(0));
      if (b.grad) write_grad(z, grad_row(b, r), b.vocab, lse, coef[r], label, read.softcap());
    }
  }
}

template <typename T>
void row_kl(const RowBatch<T>& b, const T* ref_logits, int64_t ref_stride, double scale, T* kl) {
#pragma omp parallel
  {
    RowReader<T> read(b.logits, b.logits_stride, b.vocab, b.softcap);
    RowReader<T> read_ref(ref_logits, ref_stride, b.vocab, b.softcap);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < b.rows; ++r) {
      T* out = grad_row(b, r);
      if (ignored(b, r)) {
        kl[r] = T(0);
        zero_row(out, b.vocab);
        continue;
      }
      const T* zp = read(r);
      const T* zq = read_ref(r);
      const T lse_p = row_lse(zp, b.vocab).value(), lse_q = row_lse(zq, b.vocab).value();
      T sum = T(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < b.vocab; ++i) {
        const T log_q = zq[i] - lse_q;
        sum += vexp(log_q) * (log_q - (zp[i] - lse_p));
      }
      kl[r] = sum;
      if (!out) continue;
      // ∂KL/∂z = p − q, times dz/dx under a soft-cap.
      const T s = T(scale), cap = read.softcap(), inv = cap > T(0) ? T(1) / cap : T(0);
#pragma omp simd
      for (int64_t i = 0; i < b.vocab; ++i) {
        const T t = zp[i] * inv;
        out[i] = s * (vexp(zp[i] - lse_p) - vexp(zq[i] - lse_q)) * (T(1) - t * t);
      }
    }
  }
}

template <typename T>
void row_target_ce(const RowBatch<T>& b, const T* target_logits, int64_t target_stride, double beta, double scale,
                   T* ce) {
  const bool own = target_logits == nullptr;
#pragma omp parallel
  {
    RowReader<T> read(b.logits, b.logits_stride, b.vocab, b.softcap);
    RowReader<T> read_target(own ? b.logits : target_logits, own ? b.logits_stride : target_stride, b.vocab,
                             b.softcap);
    std::vector<T> target(b.vocab);  // the target's logits, shifted at the label
#pragma omp for schedule(static)
    for (int64_t r = 0; r < b.rows; ++r) {
      T* out = grad_row(b, r);
      if (ignored(b, r)) {
        ce[r] = T(0);
        zero_row(out, b.vocab);
        continue;
      }
      const int64_t label = b.labels[r];
      const T* z = read(r);
      const T* zt = own ? z : read_target(r);
      std::copy(zt, zt + b.vocab, target.data());
      target[label] = own ? -std::numeric_limits<T>::infinity() : target[label] - T(beta);
      const T lse = row_lse(z, b.vocab).value(), lse_t = row_lse(target.data(), b.vocab).value();
      const T logprob = z[label] - lse;
      T sum = T(0);  // Σ t_v (LSE − z_v): non-negative terms
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < b.vocab; ++i) sum += vexp(target[i] - lse_t) * (lse - z[i]);
      ce[r] = sum;
      if (!out) continue;
      const T s = T(scale), cap = read.softcap(), inv = cap > T(0) ? T(1) / cap : T(0);
      if (own) {  // p − q = −q_v p_y off the label (no cancellation as p_y → 0), p_y at it
#pragma omp simd
        for (int64_t i = 0; i < b.vocab; ++i) {
          const T t = z[i] * inv;
          out[i] = -s * vexp(z[i] - lse_t + logprob) * (T(1) - t * t);
        }
        const T t = z[label] * inv;  // in place only without a cap (inv 0): z[label], overwritten, is not used
        out[label] = s * vexp(logprob) * (T(1) - t * t);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < b.vocab; ++i) {
          const T t = z[i] * inv;
          out[i] = s * (vexp(z[i] - lse) - vexp(target[i] - lse_t)) * (T(1) - t * t);
        }
      }
    }
  }
}

template <typename T>
void rowwise_dot(const T* a, const T* b, int64_t rows, int64_t cols, int64_t ld, double* row_sums) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * ld;
    const T* br = b + r * ld;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < cols; ++j) s += double(ar[j]) * double(br[j]);
    row_sums[r] += s;
  }
}

#define GEFFECT_INSTANTIATE(T)                                                                      \
  template void row_logprobs<T>(const RowBatch<T>&, T*, T*);                                        \
  template void row_grad<T>(const RowBatch<T>&, const T*, const T*);                                \
  template void row_weighted_loss<T>(const RowBatch<T>&, const T*, const WeightParams&, double, T*, \
                                     T*);                                                           \
  template void row_kl<T>(const RowBatch<T>&, const T*, int64_t, double, T*);                       \
  template void row_target_ce<T>(const RowBatch<T>&, const T*, int64_t, double, double, T*);         \
  template void rowwise_dot<T>(const T*, const T*, int64_t, int64_t, int64_t, double*);
GEFFECT_INSTANTIATE(float)
GEFFECT_INSTANTIATE(double)
#undef GEFFECT_INSTANTIATE

}  // namespace geffect::cpu
