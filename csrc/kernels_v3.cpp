// CPU kernels at the x86-64-v3 level (AVX2, FMA, F16C). CMakeLists.txt compiles this file alone
// with -march=x86-64-v3; similarity.cpp calls it only when the running CPU supports that level.
#define GALAXALIGN_ISA isa_v3
#define GALAXALIGN_ISA_NAME "x86-64-v3 (AVX2+FMA+F16C)"
#include "simd_kernels.inc"
