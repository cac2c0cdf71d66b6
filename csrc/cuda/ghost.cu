// Fused Gram ("ghost") inner product Σ_ij (G_a G_bᵀ)_ij (X_a X_bᵀ)_ij (DESIGN §4). Each block owns a
// 64×64 tile of the (i, j) grid, builds that tile of both Gram matrices in registers from shared-memory
// slices of the operands, multiplies them elementwise and reduces over j; per-row sums go to their
// segment by a float64 atomic. Neither Na×Nb matrix ever exists.
#include "common.cuh"

namespace geffect::cuda {
namespace {

constexpr int kTile = 64;   // rows of A (i) and of B (j) per block
constexpr int kSide = 16;   // threads per side: each owns a 4×4 sub-tile, strided by kSide
constexpr int kPer = kTile / kSide;
constexpr int kDepth = 16;  // slice of the inner dimension staged in shared memory

// acc[u][v] = Σ_k a[i0 + ty + u·kSide, k] · b[j0 + tx + v·kSide, k] over k < depth (rows past the end count 0).
template <typename T, typename C>
__device__ void gram_tile(const T* a, const T* b, int64_t na, int64_t nb, int64_t depth, int64_t i0, int64_t j0,
                          C (&acc)[kPer][kPer]) {
  __shared__ C as[kDepth][kTile + 1], bs[kDepth][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, lid = ty * kSide + tx;
#pragma unroll
  for (int u = 0; u < kPer; ++u)
#pragma unroll
    for (int v = 0; v < kPer; ++v) acc[u][v] = C(0);
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    for (int e = lid; e < kTile * kDepth; e += kSide * kSide) {  // consecutive threads read consecutive k
      const int row = e / kDepth, k = e % kDepth;
      const int64_t kk = k0 + k, ia = i0 + row, jb = j0 + row;
      as[k][row] = (ia < na && kk < depth) ? Storage<T>::load(a[ia * depth + kk]) : C(0);
      bs[k][row] = (jb < nb && kk < depth) ? Storage<T>::load(b[jb * depth + kk]) : C(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      C av[kPer], bv[kPer];
#pragma unroll
      for (int u = 0; u < kPer; ++u) av[u] = as[k][ty + u * kSide];
#pragma unroll
      for (int v = 0; v < kPer; ++v) bv[v] = bs[k][tx + v * kSide];
#pragma unroll
      for (int u = 0; u < kPer; ++u)
#pragma unroll
        for (int v = 0; v < kPer; ++v) acc[u][v] += av[u] * bv[v];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kSide * kSide) ghost_kernel(GhostArgs g) {
  using C = typename Storage<T>::C;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  C grads[kPer][kPer], inputs[kPer][kPer];
  gram_tile(static_cast<const T*>(g.grad_a), static_cast<const T*>(g.grad_b), g.na, g.nb, g.d_out, i0, j0, grads);
  gram_tile(static_cast<const T*>(g.input_a), static_cast<const T*>(g.input_b), g.na, g.nb, g.d_in, i0, j0, inputs);
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    double row = 0.0;
#pragma unroll
    for (int v = 0; v < kPer; ++v) row += double(grads[u][v] * inputs[u][v]);
    // the kSide threads sharing this row are lanes tx = 0..15 of one half-warp
    for (int offset = kSide / 2; offset > 0; offset >>= 1) row += __shfl_xor_sync(0xffffffffu, row, offset);
    const int64_t i = i0 + threadIdx.y + u * kSide;
    if (threadIdx.x == 0 && i < g.na) atomicAdd(g.out + (g.segment_ids ? g.segment_ids[i] : 0), row);
  }
}

}  // namespace

void ghost_inner_product(const GhostArgs& args) {
  if (args.na == 0 || args.nb == 0) return;
  const dim3 grid((args.nb + kTile - 1) / kTile, (args.na + kTile - 1) / kTile), block(kSide, kSide);
  dispatch(args.dtype, [&](auto tag) {
    ghost_kernel<decltype(tag)><<<grid, block, 0, static_cast<cudaStream_t>(args.stream)>>>(args);
  });
  check_launch("geffect ghost kernel");
}

}  // namespace geffect::cuda
