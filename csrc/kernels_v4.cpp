// CPU kernels at the x86-64-v4 level (AVX-512 F/BW/CD/DQ/VL on top of v3). CMakeLists.txt compiles
// this file alone with -march=x86-64-v4; similarity.cpp calls it only when the running CPU supports
// that level (GALAXALIGN_CPU_ISA=v3 or v2 forces a lower one).
#define GALAXALIGN_ISA isa_v4
#define GALAXALIGN_ISA_NAME "x86-64-v4 (AVX-512)"
#include "simd_kernels.inc"
