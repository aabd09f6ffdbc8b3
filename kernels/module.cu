// galaxalign_batch._cuda: CUDA kernels. Bound on raw device pointers + stream handles, so the
// build needs no torch headers; the Python side passes tensor.data_ptr() and the current stream.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

namespace py = pybind11;

namespace galaxalign_cuda {
void register_similarity(py::module_& m);  // similarity.cu: fused loss, top-k, prototypes
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "galaxalign-batch CUDA kernels";
  m.def("runtime_version", []() { int v = 0; cudaRuntimeGetVersion(&v); return v; },
        "CUDA runtime version this module was built against (e.g. 13000).");
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n;
  }, "Number of CUDA devices visible to this module (0 when no driver or device).");
  galaxalign_cuda::register_similarity(m);
}
