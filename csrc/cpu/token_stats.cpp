// CPU row kernel of token_stats: ℓ_t, the entropy of p_t and Var_{p_t}[log p_t] from one read of each row of
// logits, a block at a time: the block stays in L1 for its max, its exponentials and the two weighted sums
// about its own mean, and blocks merge as in geffect/moments.h. OpenMP over rows.
#include <algorithm>
#include <vector>

#include "geffect/kernels.h"
#include "geffect/moments.h"
#include "vec_exp.h"

namespace geffect::cpu {
namespace {

constexpr int64_t kBlock = 1024;  // elements per block

// Moments of z[0, n), n ≥ 1, using e[0, n) as scratch for the exponentials.
template <typename T>
Moments<T> block_moments(const T* z, int64_t n, T* e) {
  T m = z[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  T s = T(0), first = T(0);
#pragma omp simd reduction(+ : s, first)
  for (int64_t i = 0; i < n; ++i) {
    e[i] = vexp(z[i] - m);
    s += e[i];
    first += e[i] * (z[i] - m);
  }
  const T mean = first / s;  // relative to m; s ≥ 1: the max contributes e⁰
  T m2 = T(0);
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const T d = (z[i] - m) - mean;
    m2 += e[i] * d * d;
  }
  return Moments<T>{m, s, mean, m2};
}

}  // namespace

template <typename T>
void row_token_stats(const RowBatch<T>& b, T* logprobs, T* entropy, T* variance) {
  const T softcap = T(b.softcap);
#pragma omp parallel
  {
    std::vector<T> exps(kBlock), capped(softcap > T(0) ? kBlock : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < b.rows; ++r) {
      const int64_t label = b.labels[r];
      if (label == b.ignore_index) {
        logprobs[r] = entropy[r] = variance[r] = T(0);
        continue;
      }
      const T* row = b.logits + r * b.logits_stride;
      Moments<T> acc{T(0), T(0), T(0), T(0)};
      for (int64_t start = 0; start < b.vocab; start += kBlock) {
        const int64_t n = std::min(kBlock, b.vocab - start);
        const T* z = row + start;
        if (softcap > T(0)) {
          T unused;
          for (int64_t i = 0; i < n; ++i) capped[i] = softcapped(z[i], softcap, &unused);
          z = capped.data();
        }
        acc = moments_merge(acc, block_moments(z, n, exps.data()));
      }
      T unused;
      logprobs[r] = softcapped(row[label], softcap, &unused) - acc.lse();
      entropy[r] = acc.entropy();
      variance[r] = acc.variance();
    }
  }
}

template void row_token_stats<float>(const RowBatch<float>&, float*, float*, float*);
template void row_token_stats<double>(const RowBatch<double>&, double*, double*, double*);

}  // namespace geffect::cpu
