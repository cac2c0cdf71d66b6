// exp(x) written so that GCC/Clang auto-vectorize loops calling it (libm's exp is an opaque call
// that blocks vectorization unless -ffast-math pulls in a vector math library, which we avoid).
// Range reduction x = k·ln2 + r, |r| <= ln2/2, then a Taylor polynomial: degree 7 gives float
// accuracy (truncation < 6e-9), degree 13 double accuracy (< 2e-16). Rounding to the nearest integer
// uses the add-a-magic-constant trick, whose low mantissa bits then hold k for building 2^k.
#pragma once

#include <cstdint>
#include <cstring>

namespace geffect::cpu {

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Bits = int32_t;
  static constexpr float kLow = -87.0f, kHigh = 88.0f;  // 2^k stays a normal number
  static constexpr float kMagic = 12582912.0f;           // 1.5·2^23
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
  static constexpr int kMantissa = 23, kBias = 127, kDegree = 7;
};

template <>
struct ExpConstants<double> {
  using Bits = int64_t;
  static constexpr double kLow = -708.0, kHigh = 709.0;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5·2^52
  static constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  static constexpr int kMantissa = 52, kBias = 1023, kDegree = 13;
};

// 1/n! for n = 0..degree, computed at compile time.
template <typename T>
struct TaylorCoefficients {
  static constexpr int kDegree = ExpConstants<T>::kDegree;
  T c[kDegree + 1];
  constexpr TaylorCoefficients() : c() {
    double inverse_factorial = 1.0;
    for (int n = 0; n <= kDegree; ++n) {
      if (n > 1) inverse_factorial /= n;
      c[n] = static_cast<T>(inverse_factorial);
    }
  }
};

template <typename T>
inline constexpr TaylorCoefficients<T> kTaylor{};

// exp(x); exactly 0 below kLow (inputs here are shifted by the row maximum, so mostly <= 0).
template <typename T>
inline T vexp(T x) {
  using C = ExpConstants<T>;
  using Bits = typename C::Bits;
  const T xc = x < C::kLow ? C::kLow : (x > C::kHigh ? C::kHigh : x);
  const T shifted = xc * T(1.4426950408889634) + C::kMagic;  // k + magic, k = round(x / ln2)
  const T k = shifted - C::kMagic;
  const T r = (xc - k * C::kLn2Hi) - k * C::kLn2Lo;
  T poly = kTaylor<T>.c[C::kDegree];  // Horner on Σ r^n / n!
  for (int n = C::kDegree - 1; n >= 0; --n) poly = poly * r + kTaylor<T>.c[n];
  Bits k_bits, magic_bits;
  std::memcpy(&k_bits, &shifted, sizeof(T));
  const T magic = C::kMagic;
  std::memcpy(&magic_bits, &magic, sizeof(T));
  const Bits scale_bits = (k_bits - magic_bits + C::kBias) << C::kMantissa;
  T scale;
  std::memcpy(&scale, &scale_bits, sizeof(T));
  return x < C::kLow ? T(0) : poly * scale;
}

}  // namespace geffect::cpu
