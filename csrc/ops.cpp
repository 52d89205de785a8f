// Torch glue: declares frod_cuda::row_gather_diag / frod_cuda::sampled_dot_diag (the same schemas as the Python
// ops frod::row_gather_diag / frod::sampled_dot_diag in frod_kernels/ops.py) and registers their CUDA kernels.
// Only light torch headers here (no torch/extension.h, no ATen/cuda): this is the one file that includes torch,
// and its compile time dominates the build.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "frod_cuda.h"

#ifndef FROD_TORCH_VERSION
#error "setup.py passes -DFROD_TORCH_VERSION=<torch.__version__ of the build>"
#endif
#define FROD_STR2(x) #x
#define FROD_STR(x) FROD_STR2(x)

// Read (as bytes, without loading the library) by frod_kernels/backends/cuda.py, which refuses an extension built
// against another torch before importing it: a mismatched binary may fail or crash on load.
extern "C" __attribute__((used, visibility("default"))) const char frod_cuda_build_info[] =
    "frod-kernels-cuda-build torch=" FROD_STR(FROD_TORCH_VERSION) ";";

namespace {

using frod_cuda::DType;

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, ": expected float16, bfloat16, float32 or float64, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable: TORCH_CHECK_TYPE throws
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, ": expected a tensor on ", ref.device(), ", got ",
                    t.device());
}

void check_vector(const at::Tensor& t, int64_t len, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, op, ": ", name, ": expected shape (", len, ",), got ",
                    t.sizes());
}

void check_index(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, ": expected int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, ": expected a 1-D tensor, got shape ", t.sizes());
}

// The grouping both kernels walk: ptr (n + 1 group offsets) and src (one source row per nonzero), int64 on the
// operand's device. Returns nnz.
int64_t check_groups(const at::Tensor& ptr, const at::Tensor& src, int64_t n, const at::Tensor& like, const char* op) {
  check_index(ptr, op, "ptr");
  check_index(src, op, "src");
  check_vector(ptr, n + 1, op, "ptr");
  check_on(ptr, like, op, "ptr");
  check_on(src, like, op, "src");
  return src.size(0);
}

// The kernels read whole rows with unit stride (any row stride, any alignment). The engine hands them such operands
// (U^T included: U is stored so that its transpose has contiguous rows); a caller who passes another layout gets one
// copy here, two passes over n x m, against (n + nnz) x m gathered reads that would otherwise each touch a separate
// 32-byte sector.
at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

// The kernels index a row's elements with 32-bit integers.
void check_row_length(int64_t m, const char* op) {
  TORCH_CHECK_VALUE(m < (int64_t{1} << 31), op, ": rows of ", m, " elements: at most 2^31 - 1 are supported");
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor row_gather_diag_cuda(const at::Tensor& A, const at::Tensor& diag, const at::Tensor& weights,
                                const at::Tensor& ptr, const at::Tensor& src) {
  constexpr const char* op = "frod_cuda::row_gather_diag";
  TORCH_CHECK_VALUE(A.dim() == 2, op, ": A: expected a 2-D tensor, got shape ", A.sizes());
  const DType dt = dtype_of(A, op, "A");
  const int64_t n = A.size(0), m = A.size(1);
  const int64_t nnz = check_groups(ptr, src, n, A, op);
  check_vector(diag, n, op, "diag");
  check_vector(weights, nnz, op, "weights");
  check_on(diag, A, op, "diag");
  check_on(weights, A, op, "weights");
  check_row_length(m, op);
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor out = at::empty({n, m}, A.options());
  if (n == 0 || m == 0) return out;
  const at::Tensor a = rows_contiguous(A);
  const at::Tensor d = diag.to(acc_type(A)).contiguous();
  const at::Tensor w = weights.to(acc_type(A)).contiguous();
  const at::Tensor p = ptr.contiguous();
  const at::Tensor s = src.contiguous();
  C10_CUDA_CHECK(frod_cuda::launch_row_gather_diag(dt, a.const_data_ptr(), a.stride(0), d.const_data_ptr(),
                                                   w.const_data_ptr(), p.const_data_ptr<int64_t>(),
                                                   s.const_data_ptr<int64_t>(), out.mutable_data_ptr(), n, m,
                                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sampled_dot_diag_cuda(const at::Tensor& P, const at::Tensor& Q,
                                                         const at::Tensor& ptr, const at::Tensor& src) {
  constexpr const char* op = "frod_cuda::sampled_dot_diag";
  TORCH_CHECK_VALUE(P.dim() == 2, op, ": P: expected a 2-D tensor, got shape ", P.sizes());
  TORCH_CHECK_VALUE(Q.sizes() == P.sizes(), op, ": Q: expected shape ", P.sizes(), " (that of P), got ", Q.sizes());
  TORCH_CHECK_TYPE(Q.scalar_type() == P.scalar_type(), op, ": Q: expected dtype ", P.scalar_type(),
                   " (that of P), got ", Q.scalar_type());
  const DType dt = dtype_of(P, op, "P");
  const int64_t n = P.size(0), m = P.size(1);
  const int64_t nnz = check_groups(ptr, src, n, P, op);
  check_on(Q, P, op, "Q");
  check_row_length(m, op);
  const c10::cuda::CUDAGuard guard(P.device());
  const auto acc_opts = P.options().dtype(acc_type(P));
  at::Tensor vals = at::empty({nnz}, acc_opts);
  at::Tensor diag = at::empty({n}, acc_opts);
  if (n == 0) return {vals, diag};
  const at::Tensor p = rows_contiguous(P);
  const at::Tensor q = rows_contiguous(Q);
  const at::Tensor pp = ptr.contiguous();
  const at::Tensor ss = src.contiguous();
  const int64_t ws_elems =
      frod_cuda::sampled_dot_diag_workspace(dt, p.const_data_ptr(), p.stride(0), q.const_data_ptr(), q.stride(0), n,
                                            nnz, m);
  at::Tensor ws = at::empty({ws_elems}, acc_opts);
  C10_CUDA_CHECK(frod_cuda::launch_sampled_dot_diag(
      dt, p.const_data_ptr(), p.stride(0), q.const_data_ptr(), q.stride(0), pp.const_data_ptr<int64_t>(),
      ss.const_data_ptr<int64_t>(), vals.mutable_data_ptr(), diag.mutable_data_ptr(),
      ws_elems ? ws.mutable_data_ptr() : nullptr, n, nnz, m, c10::cuda::getCurrentCUDAStream()));
  return {vals, diag};
}

}  // namespace

// Same schema strings as the Python custom ops; tests/backends/test_cuda_backend.py checks that they stay equal.
TORCH_LIBRARY(frod_cuda, m) {
  m.def("row_gather_diag(Tensor A, Tensor diag, Tensor weights, Tensor ptr, Tensor src) -> Tensor");
  m.def("sampled_dot_diag(Tensor P, Tensor Q, Tensor ptr, Tensor src) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(frod_cuda, CUDA, m) {
  m.impl("row_gather_diag", &row_gather_diag_cuda);
  m.impl("sampled_dot_diag", &sampled_dot_diag_cuda);
}

// `import frod_kernels._C` runs the registrations above; the module itself only carries the build's torch version.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "frod-kernels CUDA C++ kernels (torch.ops.frod_cuda)",
                                   -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod != nullptr && PyModule_AddStringConstant(mod, "TORCH_VERSION", FROD_STR(FROD_TORCH_VERSION)) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
