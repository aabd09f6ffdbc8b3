// Python bindings of the CPU similarity kernels (fused contrastive loss, streamed top-k, prototype
// probabilities). Arrays arrive through the buffer protocol (numpy views of torch CPU tensors, no
// copies: arguments are noconvert, so a wrong dtype or a non-contiguous array is an error rather
// than a silent copy). The instruction-set level is chosen once from the running CPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels_api.h"
#include "registry.h"

namespace py = pybind11;

namespace galaxalign {
namespace {

bool cpu_has_v3() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

bool cpu_has_v4() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return cpu_has_v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// AVX-512 by default only off AMD: Zen 4 executes each 512-bit FMA as two 256-bit halves, and there the
// v4 loss measured 0.77x the v3 one (bench/RESULTS.md); Intel cores with two 512-bit FMA units gain.
bool prefer_v4() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return cpu_has_v4() && !__builtin_cpu_is("amd");
#else
  return false;
#endif
}

bool cpu_has_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return cpu_has_v4() && __builtin_cpu_supports("avx512bf16") &&
         isa_v4bf16::kernel_table().loss_forward_bf16 != nullptr;  // nullptr: the compiler lacked -mavx512bf16
#else
  return false;
#endif
}

const KernelTable* active = nullptr;

// The best level this CPU runs, or the one GALAXALIGN_CPU_ISA names (v2, v3, v4): a named level the CPU
// lacks is an error rather than a silent fallback, so a forced test never passes on the wrong code.
const KernelTable& table() {
  if (active == nullptr) {
    const char* env = std::getenv("GALAXALIGN_CPU_ISA");
    const std::string want = env != nullptr ? env : "";
    if (want == "v2") {
      active = &isa_v2::kernel_table();
    } else if (want == "v3") {
      if (!cpu_has_v3()) throw std::runtime_error("GALAXALIGN_CPU_ISA=v3 but this CPU lacks AVX2/FMA/F16C");
      active = &isa_v3::kernel_table();
    } else if (want == "v4") {
      if (!cpu_has_v4()) throw std::runtime_error("GALAXALIGN_CPU_ISA=v4 but this CPU lacks AVX-512 F/BW/CD/DQ/VL");
      active = &isa_v4::kernel_table();
    } else if (want.empty() || want == "auto") {
      active = prefer_v4() ? &isa_v4::kernel_table() : cpu_has_v3() ? &isa_v3::kernel_table() : &isa_v2::kernel_table();
    } else {
      throw std::runtime_error("GALAXALIGN_CPU_ISA must be v2, v3, v4 or auto, got '" + want + "'");
    }
  }
  return *active;
}

// The bf16 loss kernels (AVX512-BF16), or nullptr when bf16 inputs are upcast to float32 instead.
// GALAXALIGN_CPU_BF16: 1 forces them (an error when the CPU lacks AVX512-BF16), 0 turns them off; unset
// or auto uses them when the CPU has AVX512-BF16 and GALAXALIGN_CPU_ISA does not force v2 or v3 (a forced
// lower level means no AVX-512 code at all).
const KernelTable* bf16_active = nullptr;
bool bf16_resolved = false;

const KernelTable* bf16_table() {
  if (!bf16_resolved) {
    const char* env = std::getenv("GALAXALIGN_CPU_BF16");
    const std::string want = env != nullptr ? env : "";
    const char* isa_env = std::getenv("GALAXALIGN_CPU_ISA");
    const std::string isa = isa_env != nullptr ? isa_env : "";
    if (want == "1") {
      if (!cpu_has_bf16()) throw std::runtime_error("GALAXALIGN_CPU_BF16=1 but this CPU (or build) lacks AVX512-BF16");
      bf16_active = &isa_v4bf16::kernel_table();
    } else if (want == "0") {
      bf16_active = nullptr;
    } else if (want.empty() || want == "auto") {
      bf16_active = cpu_has_bf16() && isa != "v2" && isa != "v3" ? &isa_v4bf16::kernel_table() : nullptr;
    } else {
      throw std::runtime_error("GALAXALIGN_CPU_BF16 must be 0, 1 or auto, got '" + want + "'");
    }
    bf16_resolved = true;
  }
  return bf16_active;
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

void require(bool ok, const std::string& what) {
  if (!ok) throw py::value_error(what);
}

template <typename T>
void check_matrix(const CArray<T>& x, const char* name, int64_t rows, int64_t cols) {
  require(x.ndim() == 2 && x.shape(0) == rows && x.shape(1) == cols,
          std::string(name) + " must have shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ")");
}

template <typename T>
void check_vector(const CArray<T>& x, const char* name, int64_t n) {
  require(x.ndim() == 1 && x.shape(0) == n, std::string(name) + " must have shape (" + std::to_string(n) + ",)");
}

template <typename T> LossForwardFn<T> forward_fn();
template <> LossForwardFn<float> forward_fn<float>() { return table().loss_forward_f32; }
template <> LossForwardFn<double> forward_fn<double>() { return table().loss_forward_f64; }
template <typename T> LossBackwardFn<T> backward_fn();
template <> LossBackwardFn<float> backward_fn<float>() { return table().loss_backward_f32; }
template <> LossBackwardFn<double> backward_fn<double>() { return table().loss_backward_f64; }

template <typename T>
void bind_loss(py::module_& m) {
  m.def(
      "trimodal_loss_forward",
      [](const CArray<T>& a, const CArray<T>& b, double scale, CArray<T>& lse_row, CArray<T>& lse_col, int threads) {
        require(a.ndim() == 2 && a.shape(0) >= 1 && a.shape(1) >= 1, "a must be a non-empty (n, d) array");
        const int64_t n = a.shape(0), d = a.shape(1);
        check_matrix(b, "b", n, d);
        check_vector(lse_row, "lse_row", n);
        check_vector(lse_col, "lse_col", n);
        require(threads >= 1, "threads must be >= 1");
        const T* ap = a.data();
        const T* bp = b.data();
        T* rp = lse_row.mutable_data();
        T* cp = lse_col.mutable_data();
        py::gil_scoped_release release;
        forward_fn<T>()(ap, bp, n, d, static_cast<T>(scale), rp, cp, threads);
      },
      py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("scale"), py::arg("lse_row").noconvert(),
      py::arg("lse_col").noconvert(), py::arg("threads"),
      "Row and column log-sum-exp of L = scale * a @ b.T, one sweep over tiles, O(n) extra memory.");
  m.def(
      "trimodal_loss_backward",
      [](const CArray<T>& a, const CArray<T>& b, double scale, const CArray<T>& lse_row, const CArray<T>& lse_col,
         double coef, CArray<T>& grad_a, CArray<T>& grad_b, int threads) {
        require(a.ndim() == 2 && a.shape(0) >= 1 && a.shape(1) >= 1, "a must be a non-empty (n, d) array");
        const int64_t n = a.shape(0), d = a.shape(1);
        check_matrix(b, "b", n, d);
        check_vector(lse_row, "lse_row", n);
        check_vector(lse_col, "lse_col", n);
        check_matrix(grad_a, "grad_a", n, d);
        check_matrix(grad_b, "grad_b", n, d);
        require(threads >= 1, "threads must be >= 1");
        const T* ap = a.data();
        const T* bp = b.data();
        const T* rp = lse_row.data();
        const T* cp = lse_col.data();
        T* gap = grad_a.mutable_data();
        T* gbp = grad_b.mutable_data();
        double grad_scale = 0.0;
        {
          py::gil_scoped_release release;
          backward_fn<T>()(ap, bp, n, d, static_cast<T>(scale), rp, cp, static_cast<T>(coef), gap, gbp, &grad_scale,
                           threads);
        }
        return grad_scale;
      },
      py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("scale"), py::arg("lse_row").noconvert(),
      py::arg("lse_col").noconvert(), py::arg("coef"), py::arg("grad_a").noconvert(), py::arg("grad_b").noconvert(),
      py::arg("threads"),
      "Gradients of coef * (sum lse_row + sum lse_col), recomputing the tiles from the saved statistics; "
      "adds into grad_a, grad_b and returns the gradient for scale.");
}

// bf16 inputs arrive as their uint16 bits (numpy has no bfloat16: tensor.view(torch.uint16).numpy()).
const KernelTable& require_bf16() {
  const KernelTable* t = bf16_table();
  if (t == nullptr) throw py::value_error("the bf16 loss kernels are not in use (no AVX512-BF16, or GALAXALIGN_CPU_BF16=0)");
  return *t;
}

void bind_loss_bf16(py::module_& m) {
  m.def(
      "trimodal_loss_forward_bf16",
      [](const CArray<uint16_t>& a, const CArray<uint16_t>& b, double scale, CArray<float>& lse_row,
         CArray<float>& lse_col, int threads) {
        require(a.ndim() == 2 && a.shape(0) >= 1 && a.shape(1) >= 1, "a must be a non-empty (n, d) array");
        const int64_t n = a.shape(0), d = a.shape(1);
        check_matrix(b, "b", n, d);
        check_vector(lse_row, "lse_row", n);
        check_vector(lse_col, "lse_col", n);
        require(threads >= 1, "threads must be >= 1");
        const KernelTable& t = require_bf16();
        const uint16_t* ap = a.data();
        const uint16_t* bp = b.data();
        float* rp = lse_row.mutable_data();
        float* cp = lse_col.mutable_data();
        py::gil_scoped_release release;
        t.loss_forward_bf16(ap, bp, n, d, static_cast<float>(scale), rp, cp, threads);
      },
      py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("scale"), py::arg("lse_row").noconvert(),
      py::arg("lse_col").noconvert(), py::arg("threads"),
      "trimodal_loss_forward for bf16 features (uint16 bits), fp32 statistics: AVX512-BF16 tile products.");
  m.def(
      "trimodal_loss_backward_bf16",
      [](const CArray<uint16_t>& a, const CArray<uint16_t>& b, double scale, const CArray<float>& lse_row,
         const CArray<float>& lse_col, double coef, CArray<float>& grad_a, CArray<float>& grad_b, int threads) {
        require(a.ndim() == 2 && a.shape(0) >= 1 && a.shape(1) >= 1, "a must be a non-empty (n, d) array");
        const int64_t n = a.shape(0), d = a.shape(1);
        check_matrix(b, "b", n, d);
        check_vector(lse_row, "lse_row", n);
        check_vector(lse_col, "lse_col", n);
        check_matrix(grad_a, "grad_a", n, d);
        check_matrix(grad_b, "grad_b", n, d);
        require(threads >= 1, "threads must be >= 1");
        const KernelTable& t = require_bf16();
        const uint16_t* ap = a.data();
        const uint16_t* bp = b.data();
        const float* rp = lse_row.data();
        const float* cp = lse_col.data();
        float* gap = grad_a.mutable_data();
        float* gbp = grad_b.mutable_data();
        double grad_scale = 0.0;
        {
          py::gil_scoped_release release;
          t.loss_backward_bf16(ap, bp, n, d, static_cast<float>(scale), rp, cp, static_cast<float>(coef), gap, gbp,
                               &grad_scale, threads);
        }
        return grad_scale;
      },
      py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("scale"), py::arg("lse_row").noconvert(),
      py::arg("lse_col").noconvert(), py::arg("coef"), py::arg("grad_a").noconvert(), py::arg("grad_b").noconvert(),
      py::arg("threads"),
      "trimodal_loss_backward for bf16 features (uint16 bits): fp32 gradients added into grad_a, grad_b "
      "(the softmax weights enter the gradient products in bf16); returns the gradient for scale.");
}

void topk_update(const CArray<float>& queries, const py::array& chunk, int64_t offset, CArray<float>& best_score,
                 CArray<int64_t>& best_index, int threads) {
  require(queries.ndim() == 2 && queries.shape(0) >= 1 && queries.shape(1) >= 1,
          "queries must be a non-empty (n, d) float32 array");
  const int64_t n = queries.shape(0), d = queries.shape(1);
  require(best_score.ndim() == 2 && best_score.shape(0) == n && best_score.shape(1) >= 1,
          "best_score must have shape (n, k)");
  const int64_t k = best_score.shape(1);
  check_matrix(best_index, "best_index", n, k);
  require(chunk.ndim() == 2 && chunk.shape(1) == d, "chunk must have shape (rows, d)");
  require(chunk.flags() & py::array::c_style, "chunk must be C-contiguous");
  const py::dtype dt = chunk.dtype();
  const bool native_float = dt.kind() == 'f' && dt.attr("isnative").cast<bool>();
  const bool fp16 = native_float && dt.itemsize() == 2;
  require(fp16 || (native_float && dt.itemsize() == 4), "chunk must be native float32 or float16");
  require(threads >= 1, "threads must be >= 1");
  const int64_t rows = chunk.shape(0);
  const float* qp = queries.data();
  const void* cp = chunk.data();
  float* sp = best_score.mutable_data();
  int64_t* ip = best_index.mutable_data();
  if (rows == 0) return;
  py::gil_scoped_release release;
  table().topk_update(qp, n, d, cp, fp16, rows, offset, k, sp, ip, threads);
}

void prototype_probs(const CArray<float>& features, const CArray<float>& prototypes, double scale,
                     CArray<float>& out, int threads) {
  require(features.ndim() == 2 && features.shape(1) >= 1, "features must be an (n, d) float32 array");
  const int64_t n = features.shape(0), d = features.shape(1);
  require(prototypes.ndim() == 2 && prototypes.shape(0) >= 1 && prototypes.shape(1) == d,
          "prototypes must have shape (k, d)");
  const int64_t k = prototypes.shape(0);
  check_matrix(out, "out", n, k);
  require(threads >= 1, "threads must be >= 1");
  if (n == 0) return;
  const float* fp = features.data();
  const float* pp = prototypes.data();
  float* op = out.mutable_data();
  py::gil_scoped_release release;
  table().prototype_probs(fp, n, d, pp, k, static_cast<float>(scale), op, threads);
}

}  // namespace

void register_similarity(py::module_& m) {
  bind_loss<float>(m);
  bind_loss<double>(m);
  m.def("topk_update", &topk_update, py::arg("queries").noconvert(), py::arg("chunk"), py::arg("offset"),
        py::arg("best_score").noconvert(), py::arg("best_index").noconvert(), py::arg("threads"),
        "Stream one chunk of rows (float32 or float16) into each query's running top-k (score desc, index asc).");
  m.def("prototype_probs", &prototype_probs, py::arg("features").noconvert(), py::arg("prototypes").noconvert(),
        py::arg("scale"), py::arg("out").noconvert(), py::arg("threads"),
        "out = softmax over prototypes of scale * features @ prototypes.T, written without other n x k buffers.");
  m.def("similarity_isa", []() { return std::string(table().isa); },
        "Instruction-set level of the similarity kernels in use (GALAXALIGN_CPU_ISA=v2|v3|v4 forces one).");
  m.def("cpu_supports_v3", &cpu_has_v3, "Whether this CPU runs the x86-64-v3 (AVX2+FMA+F16C) kernels.");
  m.def("cpu_supports_v4", &cpu_has_v4, "Whether this CPU runs the x86-64-v4 (AVX-512) kernels.");
  bind_loss_bf16(m);
  m.def("similarity_bf16", []() { const KernelTable* t = bf16_table(); return std::string(t != nullptr ? t->isa : ""); },
        "The bf16 loss kernels in use ('' when bf16 inputs are upcast to float32); GALAXALIGN_CPU_BF16=0|1|auto.");
  m.def("cpu_supports_bf16", &cpu_has_bf16, "Whether this CPU (and build) runs the AVX512-BF16 loss kernels.");
}

}  // namespace galaxalign
