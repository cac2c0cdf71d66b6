// CUDA row kernel of token_stats: ℓ_t, the entropy of p_t and Var_{p_t}[log p_t] from one read of each row
// of logits, one 1024-thread block per row. Each thread summarizes its 16-byte vectors (max, Σexp, mean and
// squared deviations about the vector's own mean) and merges them into its running summary; the block then
// merges the threads' summaries (geffect/moments.h), so no difference of raw moments is ever taken.
#include <cmath>

#include "common.cuh"
#include "geffect/moments.h"

namespace geffect::cuda {
namespace {

constexpr int kThreads = 1024;

// Merges `count` soft-capped values into a thread's running summary.
template <typename T, typename C>
__device__ __forceinline__ void moments_add(Moments<C>& acc, const C* values, int count, C softcap) {
  C z[16 / sizeof(T)], e[16 / sizeof(T)];
  C m = -INFINITY, unused;
  for (int k = 0; k < count; ++k) {
    z[k] = softcapped(values[k], softcap, &unused);
    m = z[k] > m ? z[k] : m;
  }
  C s = C(0), first = C(0);
  for (int k = 0; k < count; ++k) {
    e[k] = Storage<T>::exp(z[k] - m);
    s += e[k];
    first += e[k] * (z[k] - m);
  }
  const C mean = first / s;  // relative to m; s ≥ 1: the max contributes e⁰
  C m2 = C(0);
  for (int k = 0; k < count; ++k) {
    const C d = (z[k] - m) - mean;
    m2 += e[k] * d * d;
  }
  acc = moments_merge(acc, Moments<C>{m, s, mean, m2});
}

// Block-wide merge (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename C>
__device__ Moments<C> block_moments(Moments<C> v) {
  __shared__ C max_s[32], sum_s[32], mean_s[32], m2_s[32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Moments<C> other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset),
                           __shfl_xor_sync(0xffffffffu, v.mean, offset), __shfl_xor_sync(0xffffffffu, v.m2, offset)};
    v = moments_merge(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    max_s[warp] = v.max;
    sum_s[warp] = v.sum;
    mean_s[warp] = v.mean;
    m2_s[warp] = v.m2;
  }
  __syncthreads();
  Moments<C> acc{max_s[0], sum_s[0], mean_s[0], m2_s[0]};
  for (int w = 1; w < warps; ++w) acc = moments_merge(acc, Moments<C>{max_s[w], sum_s[w], mean_s[w], m2_s[w]});
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
token_stats_kernel(RowBatchAny b, typename Storage<T>::C* logprobs, typename Storage<T>::C* entropy,
                   typename Storage<T>::C* variance) {
  using C = typename Storage<T>::C;
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(b.logits) + r * b.logits_stride;
  const int64_t label = b.labels[r];
  if (label == b.ignore_index) {
    if (threadIdx.x == 0) logprobs[r] = entropy[r] = variance[r] = C(0);
    return;
  }
  const C softcap = C(b.softcap);
  Moments<C> acc{C(-INFINITY), C(0), C(0), C(0)};
  visit_row(row, b.vocab, [&](int64_t, const C* v, int count) { moments_add<T>(acc, v, count, softcap); });
  acc = block_moments(acc);
  if (threadIdx.x == 0) {
    C unused;
    logprobs[r] = softcapped(Storage<T>::load(row[label]), softcap, &unused) - acc.lse();
    entropy[r] = acc.entropy();
    variance[r] = acc.variance();
  }
}

}  // namespace

void row_token_stats(const RowBatchAny& b, void* logprobs, void* entropy, void* variance) {
  if (b.rows == 0) return;
  dispatch(b.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = typename Storage<T>::C;
    token_stats_kernel<T><<<b.rows, kThreads, 0, static_cast<cudaStream_t>(b.stream)>>>(
        b, static_cast<C*>(logprobs), static_cast<C*>(entropy), static_cast<C*>(variance));
  });
  check_launch("geffect token_stats kernel");
}

}  // namespace geffect::cuda
