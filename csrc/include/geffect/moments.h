// Streaming moments of the logits under the softmax, for token_stats: the entropy of p = softmax(z) is
// LSE − E_p[z] and Var_p[log p] = Var_p[z]. Pieces of a row (blocks, threads, vocabulary splits) are
// summarized by (max, Σ e^{z−max}, E_p[z] − max, Σ e^{z−max}(z − E_p[z])²) and merged pairwise as in Chan et
// al.'s parallel variance: the squares are taken about each piece's own mean, so the variance is never a
// difference of nearly equal raw moments, and the mean is kept relative to the max, so an entropy near 0
// (a peaky row) is not the difference of two logit-sized numbers.
#pragma once

#include "geffect/math.h"

namespace geffect {

template <typename T>
struct Moments {
  T max;   // largest logit seen (−inf when empty)
  T sum;   // Σ e^{z − max} (0 when empty)
  T mean;  // E_p[z] − max over the piece (≤ 0)
  T m2;    // Σ e^{z − max} (z − E_p[z])²

  GEFFECT_HD T lse() const { return max + log_(sum); }
  GEFFECT_HD T entropy() const { return log_(sum) - mean; }
  GEFFECT_HD T variance() const { return m2 / sum; }
};

// Merge two pieces; either may be empty (sum = 0).
template <typename T>
GEFFECT_HD Moments<T> moments_merge(Moments<T> a, Moments<T> b) {
  if (b.sum == T(0)) return a;
  if (a.sum == T(0)) return b;
  const T m = a.max >= b.max ? a.max : b.max;
  const T ra = exp_(a.max - m), rb = exp_(b.max - m);  // one of them is 1
  const T sa = a.sum * ra, sb = b.sum * rb, s = sa + sb;
  const T mean_a = a.mean + (a.max - m), mean_b = b.mean + (b.max - m);  // both ≤ 0, relative to the new max
  const T fa = sa / s, fb = sb / s, delta = mean_b - mean_a;
  // the mean as a convex combination of two numbers of one sign: nothing cancels
  return Moments<T>{m, s, fa * mean_a + fb * mean_b, a.m2 * ra + b.m2 * rb + delta * delta * sa * fb};
}

}  // namespace geffect
