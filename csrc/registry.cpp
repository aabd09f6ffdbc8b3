#include "registry.h"

namespace galaxalign {
// Kernel families add their register_* calls here.
void register_all(pybind11::module_& m) { register_similarity(m); }
}  // namespace galaxalign
