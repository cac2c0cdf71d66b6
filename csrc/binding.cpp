// The only torch code in csrc/: checks tensors, hands raw pointers to the CPU kernels (csrc/cpu) or,
// when built with GEFFECT_WITH_CUDA, to the CUDA kernels (csrc/cuda). Per-row outputs are in the
// compute dtype (float64 for float64 logits, float32 otherwise).
// ATen and torch's pybind11 casters only, not <torch/extension.h>: half the compile time.
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "geffect/kernels.h"

#ifdef GEFFECT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

at::ScalarType compute_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1), name,
              " must be a 2-D tensor whose rows are contiguous, got sizes ", t.sizes(), " strides ", t.strides());
}

void check_vector(const Tensor& t, const Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(), name,
              " must be a contiguous vector with one entry per row");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), name, " is on ", t.device(), " but the logits are on ", logits.device());
}

// Validates the shared arguments of every row kernel.
void check_batch(const Tensor& logits, const OptTensor& grad, const Tensor& labels) {
  check_rows(logits, "logits");
  check_vector(labels, logits, at::kLong, "labels");
  if (grad) {
    check_rows(*grad, "grad");
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->scalar_type() == logits.scalar_type() &&
                    grad->device() == logits.device(),
                "grad must match the logits in shape, dtype and device");
  }
  if (logits.is_cuda()) {
#ifndef GEFFECT_WITH_CUDA
    TORCH_CHECK(false, "this build of the geffect extension has no CUDA kernels");
#endif
  } else {
    TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                "the CPU kernels take float32 or float64 logits, got ", logits.scalar_type());
  }
}

template <typename T>
geffect::RowBatch<T> cpu_batch(const Tensor& logits, const OptTensor& grad, const Tensor& labels,
                               int64_t ignore_index, double softcap) {
  return {logits.data_ptr<T>(), logits.stride(0), grad ? grad->data_ptr<T>() : nullptr, grad ? grad->stride(0) : 0,
          labels.data_ptr<int64_t>(), ignore_index, logits.size(0), logits.size(1), softcap};
}

template <typename F>
void cpu_dispatch(const Tensor& logits, F&& f) {
  if (logits.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// The loss scale (1/n_valid, computed on the logits' device): a one-element float64 tensor there. The CUDA kernels
// read it in device memory, so no call waits for the device; the CPU kernels take its value.
void check_scale(const Tensor& scale, const Tensor& logits) {
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kDouble && scale.device() == logits.device(),
              "scale must be a one-element float64 tensor on ", logits.device(), ", got ", scale.scalar_type(),
              " of ", scale.numel(), " elements on ", scale.device());
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

#ifdef GEFFECT_WITH_CUDA
geffect::cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return geffect::cuda::DType::kFloat32;
    case at::kDouble: return geffect::cuda::DType::kFloat64;
    case at::kHalf: return geffect::cuda::DType::kFloat16;
    case at::kBFloat16: return geffect::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "the CUDA kernels take float16/bfloat16/float32/float64, got ", t);
  }
}

geffect::cuda::RowBatchAny cuda_batch(const Tensor& logits, const OptTensor& grad, const Tensor& labels,
                                      int64_t ignore_index, double softcap) {
  return {logits.data_ptr(), logits.stride(0), grad ? grad->data_ptr() : nullptr, grad ? grad->stride(0) : 0,
          labels.data_ptr<int64_t>(), ignore_index, logits.size(0), logits.size(1), softcap,
          cuda_dtype(logits.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()};
}

const void* data_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }
#define GEFFECT_CUDA_GUARD(t) const c10::cuda::OptionalCUDAGuard guard(t.device())
#endif

std::vector<Tensor> row_logprobs(const Tensor& logits, const Tensor& labels, int64_t ignore_index, double softcap) {
  check_batch(logits, c10::nullopt, labels);
  Tensor logprobs = at::empty({logits.size(0)}, logits.options().dtype(compute_dtype(logits)));
  Tensor lse = at::empty_like(logprobs);
#ifdef GEFFECT_WITH_CUDA
  if (logits.is_cuda()) {
    GEFFECT_CUDA_GUARD(logits);
    geffect::cuda::row_logprobs(cuda_batch(logits, c10::nullopt, labels, ignore_index, softcap), logprobs.data_ptr(),
                                lse.data_ptr());
    return {logprobs, lse};
  }
#endif
  cpu_dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::row_logprobs<T>(cpu_batch<T>(logits, c10::nullopt, labels, ignore_index, softcap),
                                  logprobs.data_ptr<T>(), lse.data_ptr<T>());
  });
  return {logprobs, lse};
}

void row_grad(const Tensor& logits, const Tensor& grad, const Tensor& labels, const Tensor& lse, const Tensor& coef,
              int64_t ignore_index, double softcap) {
  check_batch(logits, grad, labels);
  check_vector(lse, logits, compute_dtype(logits), "lse");
  check_vector(coef, logits, compute_dtype(logits), "coef");
#ifdef GEFFECT_WITH_CUDA
  if (logits.is_cuda()) {
    GEFFECT_CUDA_GUARD(logits);
    geffect::cuda::row_grad(cuda_batch(logits, grad, labels, ignore_index, softcap), lse.data_ptr(), coef.data_ptr());
    return;
  }
#endif
  cpu_dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::row_grad<T>(cpu_batch<T>(logits, grad, labels, ignore_index, softcap), lse.data_ptr<T>(),
                              coef.data_ptr<T>());
  });
}

std::vector<Tensor> row_weighted_loss(const Tensor& logits, const OptTensor& grad, const Tensor& labels,
                                      const OptTensor& ref, int64_t ignore_index, double softcap, int64_t kind,
                                      double alpha, double beta, double gamma, double eps, const Tensor& scale) {
  check_batch(logits, grad, labels);
  check_scale(scale, logits);
  if (ref) check_vector(*ref, logits, compute_dtype(logits), "ref_logprobs");
  TORCH_CHECK(geffect::is_weight_kind(kind), "unknown token-weight code ", kind, " (catalog.KernelWeight)");
  TORCH_CHECK(ref || (kind != geffect::kTnpo && kind != geffect::kWtnpo), "this weighting needs ref_logprobs");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  const geffect::WeightParams w{static_cast<int>(kind), alpha, beta, gamma, eps};
  Tensor logprobs = at::empty({logits.size(0)}, logits.options().dtype(compute_dtype(logits)));
  Tensor coef = at::empty_like(logprobs);
#ifdef GEFFECT_WITH_CUDA
  if (logits.is_cuda()) {
    GEFFECT_CUDA_GUARD(logits);
    geffect::cuda::row_weighted_loss(cuda_batch(logits, grad, labels, ignore_index, softcap), data_or_null(ref), w,
                                     scale.data_ptr<double>(), logprobs.data_ptr(), coef.data_ptr());
    return {logprobs, coef};
  }
#endif
  cpu_dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::row_weighted_loss<T>(cpu_batch<T>(logits, grad, labels, ignore_index, softcap), ptr_or_null<T>(ref),
                                       w, scale.item<double>(), logprobs.data_ptr<T>(), coef.data_ptr<T>());
  });
  return {logprobs, coef};
}

Tensor row_kl(const Tensor& logits, const Tensor& ref_logits, const OptTensor& grad, const Tensor& labels,
              int64_t ignore_index, double softcap, const Tensor& scale) {
  check_batch(logits, grad, labels);
  check_scale(scale, logits);
  check_rows(ref_logits, "ref_logits");
  TORCH_CHECK(ref_logits.sizes() == logits.sizes() && ref_logits.scalar_type() == logits.scalar_type() &&
                  ref_logits.device() == logits.device(),
              "ref_logits must match the logits in shape, dtype and device");
  Tensor kl = at::empty({logits.size(0)}, logits.options().dtype(compute_dtype(logits)));
#ifdef GEFFECT_WITH_CUDA
  if (logits.is_cuda()) {
    GEFFECT_CUDA_GUARD(logits);
    geffect::cuda::row_kl(cuda_batch(logits, grad, labels, ignore_index, softcap), ref_logits.data_ptr(),
                          ref_logits.stride(0), scale.data_ptr<double>(), kl.data_ptr());
    return kl;
  }
#endif
  cpu_dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::row_kl<T>(cpu_batch<T>(logits, grad, labels, ignore_index, softcap), ref_logits.data_ptr<T>(),
                            ref_logits.stride(0), scale.item<double>(), kl.data_ptr<T>());
  });
  return kl;
}

// Cross-entropy per row to softmax(target − β·onehot(y)) (UNDIAL), or, without target_logits, to the row's own
// distribution without the label (CE-U); gradient into `grad` when given.
Tensor row_target_ce(const Tensor& logits, const OptTensor& target_logits, const OptTensor& grad, const Tensor& labels,
                     int64_t ignore_index, double softcap, const Tensor& scale, double beta) {
  check_batch(logits, grad, labels);
  check_scale(scale, logits);
  const bool own = !target_logits.has_value();
  if (!own) {
    check_rows(*target_logits, "target_logits");
    TORCH_CHECK(target_logits->sizes() == logits.sizes() && target_logits->scalar_type() == logits.scalar_type() &&
                    target_logits->device() == logits.device(),
                "target_logits must match the logits in shape, dtype and device");
  }
  const int64_t target_stride = own ? 0 : target_logits->stride(0);
  Tensor ce = at::empty({logits.size(0)}, logits.options().dtype(compute_dtype(logits)));
#ifdef GEFFECT_WITH_CUDA
  if (logits.is_cuda()) {
    GEFFECT_CUDA_GUARD(logits);
    geffect::cuda::row_target_ce(cuda_batch(logits, grad, labels, ignore_index, softcap),
                                 own ? nullptr : target_logits->data_ptr(), target_stride, beta,
                                 scale.data_ptr<double>(), ce.data_ptr());
    return ce;
  }
#endif
  cpu_dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::row_target_ce<T>(cpu_batch<T>(logits, grad, labels, ignore_index, softcap),
                                   own ? nullptr : target_logits->data_ptr<T>(), target_stride, beta,
                                   scale.item<double>(), ce.data_ptr<T>());
  });
  return ce;
}

// token_stats per row: {ℓ, entropy, Var_p[log p]} in the compute dtype.
std::vector<Tensor> row_token_stats(const Tensor& logits, const Tensor& labels, int64_t ignore_index, double softcap) {
  check_batch(logits, c10::nullopt, labels);
  Tensor logprobs = at::empty({logits.size(0)}, logits.options().dtype(compute_dtype(logits)));
  Tensor entropy = at::empty_like(logprobs), variance = at::empty_like(logprobs);
#ifdef GEFFECT_WITH_CUDA
  if (logits.is_cuda()) {
    GEFFECT_CUDA_GUARD(logits);
    geffect::cuda::row_token_stats(cuda_batch(logits, c10::nullopt, labels, ignore_index, softcap),
                                   logprobs.data_ptr(), entropy.data_ptr(), variance.data_ptr());
    return {logprobs, entropy, variance};
  }
#endif
  cpu_dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::row_token_stats<T>(cpu_batch<T>(logits, c10::nullopt, labels, ignore_index, softcap),
                                     logprobs.data_ptr<T>(), entropy.data_ptr<T>(), variance.data_ptr<T>());
  });
  return {logprobs, entropy, variance};
}

// row_sums[i] += Σ_j a[i, j] b[i, j] (CPU; the fused product-and-reduce step of the tiled Gram form).
void rowwise_dot(const Tensor& a, const Tensor& b, Tensor& row_sums) {
  check_rows(a, "a");
  TORCH_CHECK(!a.is_cuda(), "rowwise_dot is a CPU kernel");
  TORCH_CHECK(b.sizes() == a.sizes() && b.strides() == a.strides() && b.scalar_type() == a.scalar_type() &&
                  !b.is_cuda(),
              "b must match a in shape, strides, dtype and device");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, "rowwise_dot takes float32/float64");
  TORCH_CHECK(row_sums.dim() == 1 && row_sums.size(0) == a.size(0) && row_sums.scalar_type() == at::kDouble &&
                  row_sums.is_contiguous() && !row_sums.is_cuda(),
              "row_sums must be a contiguous float64 CPU vector with one entry per row");
  cpu_dispatch(a, [&](auto tag) {
    using T = decltype(tag);
    geffect::cpu::rowwise_dot<T>(a.data_ptr<T>(), b.data_ptr<T>(), a.size(0), a.size(1), a.stride(0),
                                 row_sums.data_ptr<double>());
  });
}

#ifdef GEFFECT_WITH_CUDA
Tensor ghost_inner_product_cuda(const Tensor& grad_a, const Tensor& input_a, const Tensor& grad_b,
                                const Tensor& input_b, const OptTensor& segment_ids, int64_t num_segments) {
  const Tensor ga = grad_a.contiguous(), xa = input_a.contiguous(), gb = grad_b.contiguous(), xb = input_b.contiguous();
  TORCH_CHECK(ga.is_cuda(), "ghost_inner_product_cuda takes CUDA tensors");
  TORCH_CHECK(ga.size(0) <= int64_t(65535) * 64, "grad_a has too many rows for one launch");
  GEFFECT_CUDA_GUARD(ga);
  Tensor out = at::zeros({segment_ids ? num_segments : 1}, ga.options().dtype(at::kDouble));
  const Tensor seg = segment_ids ? segment_ids->contiguous() : Tensor();
  geffect::cuda::ghost_inner_product({ga.data_ptr(), xa.data_ptr(), gb.data_ptr(), xb.data_ptr(), ga.size(0),
                                      gb.size(0), ga.size(1), xa.size(1),
                                      segment_ids ? seg.data_ptr<int64_t>() : nullptr, out.data_ptr<double>(),
                                      cuda_dtype(ga.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()});
  return out;
}
#endif

bool has_cuda() {
#ifdef GEFFECT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "geffect_kernels C++/CUDA kernels (see csrc/include/geffect/kernels.h)";
  namespace py = pybind11;
  m.def("row_logprobs", &row_logprobs, py::arg("logits"), py::arg("labels"), py::arg("ignore_index"),
        py::arg("softcap"));
  m.def("row_grad", &row_grad, py::arg("logits"), py::arg("grad"), py::arg("labels"), py::arg("lse"), py::arg("coef"),
        py::arg("ignore_index"), py::arg("softcap"));
  m.def("row_weighted_loss", &row_weighted_loss, py::arg("logits"), py::arg("grad"), py::arg("labels"),
        py::arg("ref"), py::arg("ignore_index"), py::arg("softcap"), py::arg("kind"), py::arg("alpha"),
        py::arg("beta"), py::arg("gamma"), py::arg("eps"), py::arg("scale"));
  m.def("row_kl", &row_kl, py::arg("logits"), py::arg("ref_logits"), py::arg("grad"), py::arg("labels"),
        py::arg("ignore_index"), py::arg("softcap"), py::arg("scale"));
  m.def("row_target_ce", &row_target_ce, py::arg("logits"), py::arg("target_logits"), py::arg("grad"),
        py::arg("labels"), py::arg("ignore_index"), py::arg("softcap"), py::arg("scale"), py::arg("beta"));
  m.def("row_token_stats", &row_token_stats, py::arg("logits"), py::arg("labels"), py::arg("ignore_index"),
        py::arg("softcap"));
  m.def("rowwise_dot", &rowwise_dot, py::arg("a"), py::arg("b"), py::arg("row_sums"));
#ifdef GEFFECT_WITH_CUDA
  m.def("ghost_inner_product_cuda", &ghost_inner_product_cuda, py::arg("grad_a"), py::arg("input_a"),
        py::arg("grad_b"), py::arg("input_b"), py::arg("segment_ids"), py::arg("num_segments"));
#endif
  m.def("has_cuda", &has_cuda);
}
