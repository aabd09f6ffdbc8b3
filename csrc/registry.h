// Registration hooks: each kernel family defines one register_* function.
#pragma once
#include <pybind11/pybind11.h>

namespace galaxalign {
void register_all(pybind11::module_& m);
void register_similarity(pybind11::module_& m);  // similarity.cpp: fused loss, top-k, prototypes
}  // namespace galaxalign
