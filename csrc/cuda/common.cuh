// Device helpers shared by the CUDA kernels: dtype conversion, 16-byte vector access to a row, and
// block-wide reductions. No torch headers: plain nvcc compiles everything under csrc/cuda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "geffect/kernels.h"

namespace geffect::cuda {

// Storage type T <-> compute type C (double for double storage, float otherwise), and the exp used on
// C: the hardware approximation is ample for 16-bit logits; float32/float64 get the library functions.
template <typename T> struct Storage;
template <> struct Storage<float> {
  using C = float;
  static __device__ __forceinline__ C load(float x) { return x; }
  static __device__ __forceinline__ float store(C x) { return x; }
  static __device__ __forceinline__ C exp(C x) { return expf(x); }
};
template <> struct Storage<double> {
  using C = double;
  static __device__ __forceinline__ C load(double x) { return x; }
  static __device__ __forceinline__ double store(C x) { return x; }
  static __device__ __forceinline__ C exp(C x) { return ::exp(x); }
};
template <> struct Storage<__half> {
  using C = float;
  static __device__ __forceinline__ C load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(C x) { return __float2half_rn(x); }
  static __device__ __forceinline__ C exp(C x) { return __expf(x); }
};
template <> struct Storage<__nv_bfloat16> {
  using C = float;
  static __device__ __forceinline__ C load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(C x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ C exp(C x) { return __expf(x); }
};

// Calls f(i, values, count) over this thread's share of row[0, n): scalars up to the first 16-byte
// boundary, then 16-byte vectors of kVec elements, then the scalar tail. Values are in the compute type.
template <typename T, typename F>
__device__ __forceinline__ void visit_row(const T* row, int64_t n, F&& f) {
  using C = typename Storage<T>::C;
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(row) % 16;
  int64_t head = misalign ? (16 - misalign) / sizeof(T) : 0;
  head = head < n ? head : n;
  const int64_t vectors = (n - head) / kVec;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const C v[1] = {Storage<T>::load(row[i])};
    f(i, v, 1);
  }
  const uint4* vec_row = reinterpret_cast<const uint4*>(row + head);
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const uint4 raw = vec_row[v];
    const T* packed = reinterpret_cast<const T*>(&raw);
    C vals[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) vals[k] = Storage<T>::load(packed[k]);
    f(head + v * kVec, vals, kVec);
  }
  for (int64_t i = head + vectors * kVec + threadIdx.x; i < n; i += blockDim.x) {
    const C v[1] = {Storage<T>::load(row[i])};
    f(i, v, 1);
  }
}

// out[i] = f(i, in[i]) over this thread's share of [0, n); 16-byte loads and stores when `in` and
// `out` are equally aligned (always so in place), element by element otherwise. Each element is
// read and written by the same thread, so in place needs no synchronization.
template <typename T, typename F>
__device__ __forceinline__ void map_row(const T* in, T* out, int64_t n, F&& f) {
  using C = typename Storage<T>::C;
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(in) % 16;
  if (misalign != reinterpret_cast<uintptr_t>(out) % 16) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = Storage<T>::store(f(i, Storage<T>::load(in[i])));
    return;
  }
  int64_t head = misalign ? (16 - misalign) / sizeof(T) : 0;
  head = head < n ? head : n;
  const int64_t vectors = (n - head) / kVec;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) out[i] = Storage<T>::store(f(i, Storage<T>::load(in[i])));
  const uint4* vec_in = reinterpret_cast<const uint4*>(in + head);
  uint4* vec_out = reinterpret_cast<uint4*>(out + head);
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    uint4 raw = vec_in[v];
    T* packed = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) packed[k] = Storage<T>::store(f(head + v * kVec + k, Storage<T>::load(packed[k])));
    vec_out[v] = raw;
  }
  for (int64_t i = head + vectors * kVec + threadIdx.x; i < n; i += blockDim.x)
    out[i] = Storage<T>::store(f(i, Storage<T>::load(in[i])));
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024). Every thread gets the result.
template <typename C>
__device__ Lse<C> block_lse(Lse<C> v) {
  __shared__ C max_s[32], sum_s[32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Lse<C> other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)};
    v = lse_merge(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // the shared slots may still be read by a previous call
  if (lane == 0) {
    max_s[warp] = v.max;
    sum_s[warp] = v.sum;
  }
  __syncthreads();
  Lse<C> acc{max_s[0], sum_s[0]};
  for (int w = 1; w < warps; ++w) acc = lse_merge(acc, Lse<C>{max_s[w], sum_s[w]});
  return acc;
}

template <typename C>
__device__ C block_sum(C v) {
  __shared__ C part[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  C acc = C(0);
  for (int w = 0; w < warps; ++w) acc += part[w];
  return acc;
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Calls f(T{}) with T the storage type named by `dtype`.
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace geffect::cuda
