// galaxalign_batch._core: CPU kernels (C++17, OpenMP). Each kernel file registers itself here.
#include <pybind11/pybind11.h>
#include <omp.h>
#include <string>

#include "registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "galaxalign-batch CPU kernels (C++17, OpenMP)";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = GALAXALIGN_VERSION;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    d["openmp"] = static_cast<int>(_OPENMP);
    return d;
  }, "Compiler, OpenMP version and package version this module was built with.");
  m.def("max_threads", []() { return omp_get_max_threads(); }, "OpenMP threads available to the kernels.");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); }, py::arg("n"),
        "Set the number of OpenMP threads the kernels use.");
  galaxalign::register_all(m);
}
