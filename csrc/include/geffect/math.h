// Math shared by the CPU and CUDA kernels (DESIGN §2–§3): the online log-sum-exp update, the soft-cap,
// and the detached per-token weights. Every function is scalar and __host__ __device__, so both sides
// compute exactly the same formulas; T is float or double (the compute type).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define GEFFECT_HD __host__ __device__ __forceinline__
#else
#define GEFFECT_HD inline
#endif

namespace geffect {

// Overloads so templates pick the float or double libm function on host and device alike.
GEFFECT_HD float exp_(float x) { return expf(x); }
GEFFECT_HD double exp_(double x) { return exp(x); }
GEFFECT_HD float log_(float x) { return logf(x); }
GEFFECT_HD double log_(double x) { return log(x); }
GEFFECT_HD float expm1_(float x) { return expm1f(x); }
GEFFECT_HD double expm1_(double x) { return expm1(x); }
GEFFECT_HD float tanh_(float x) { return tanhf(x); }
GEFFECT_HD double tanh_(double x) { return tanh(x); }
GEFFECT_HD float pow_(float x, float y) { return powf(x, y); }
GEFFECT_HD double pow_(double x, double y) { return pow(x, y); }

// Running log-sum-exp of a stream of values: max and Σ exp(x − max).
template <typename T>
struct Lse {
  T max;
  T sum;
  GEFFECT_HD T value() const { return max + log_(sum); }
};

// Merge a partial (m, s) into the running state; either side may be empty (s = 0, m = −inf).
template <typename T>
GEFFECT_HD Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  if (b.sum == T(0)) return a;
  if (a.sum == T(0)) return b;
  return a.max >= b.max ? Lse<T>{a.max, a.sum + b.sum * exp_(b.max - a.max)}
                        : Lse<T>{b.max, b.sum + a.sum * exp_(a.max - b.max)};
}

// Soft-cap z = s·tanh(x/s); `dzdx` gets 1 − tanh². softcap <= 0 means none.
template <typename T>
GEFFECT_HD T softcapped(T x, T softcap, T* dzdx) {
  if (softcap <= T(0)) {
    *dzdx = T(1);
    return x;
  }
  const T t = tanh_(x / softcap);
  *dzdx = T(1) - t * t;
  return softcap * t;
}

// Overflow-free logistic sigmoid.
template <typename T>
GEFFECT_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + exp_(-x));
  const T e = exp_(x);
  return e / (T(1) + e);
}

// Token-weight formulas by code: catalog.KernelWeight (geffect_kernels/catalog.py), mirrored name by name
// (kOne is ONE); tests/test_weight_codes.py fails when the two drift apart.
enum WeightKind : int { kOne = 0, kWga = 1, kSatimp = 2, kTnpo = 3, kWtnpo = 4 };

// Whether token_weight has a formula for `kind`: the binding refuses any other code before a kernel runs.
GEFFECT_HD bool is_weight_kind(int64_t kind) {
  switch (kind) {
    case kOne:
    case kWga:
    case kSatimp:
    case kTnpo:
    case kWtnpo:
      return true;
    default:
      return false;
  }
}

struct WeightParams {
  int kind;
  double alpha, beta, gamma, eps;
};

// TNPO's 2p^β / (p^β + p_ref^β + ε). ε = 0: the exact, overflow-free σ form 2σ(β(ℓ − ℓ_ref)); ε > 0 (the
// official code's 1e-5): in log space, shifted by the larger of βℓ, βℓ_ref (ε·e^{−m} → inf gives 0).
template <typename T>
GEFFECT_HD T tnpo_weight(T logprob, T ref_logprob, double beta, double eps) {
  const T x = T(beta) * logprob, x_ref = T(beta) * ref_logprob;
  if (eps == 0.0) return T(2) * sigmoid(x - x_ref);
  const T m = x > x_ref ? x : x_ref;
  const T a = exp_(x - m);
  return T(2) * a / (a + exp_(x_ref - m) + T(eps) * exp_(-m));
}

// w_t of DESIGN §3 from ℓ_t and ℓ_ref,t; NaN for a code without a formula (is_weight_kind keeps those out).
template <typename T>
GEFFECT_HD T token_weight(const WeightParams& w, T logprob, T ref_logprob) {
  switch (w.kind) {
    case kOne:
      return T(1);
    case kWga:
      return exp_(T(w.alpha) * logprob);
    case kSatimp: {
      T one_minus_p = -expm1_(logprob);  // 1 − p without cancellation as p → 0
      one_minus_p = one_minus_p > T(0) ? one_minus_p : T(0);
      return exp_(T(w.alpha) * logprob) * pow_(one_minus_p, T(w.gamma));
    }
    case kTnpo:
      return tnpo_weight(logprob, ref_logprob, w.beta, w.eps);
    case kWtnpo:
      return exp_(T(w.alpha) * logprob) * tnpo_weight(logprob, ref_logprob, w.beta, w.eps);
    default:
      return T(NAN);
  }
}

}  // namespace geffect
