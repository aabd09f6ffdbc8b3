// CPU kernels at x86-64-v4 plus AVX512-BF16 (vdpbf16ps: bf16 pairs, fp32 accumulation). CMakeLists.txt
// compiles this file alone with -march=x86-64-v4 -mavx512bf16; similarity.cpp takes only its bf16 loss
// (loss_forward_bf16 / loss_backward_bf16), and only when the CPU has AVX512-BF16 (GALAXALIGN_CPU_BF16).
#define GALAXALIGN_ISA isa_v4bf16
#define GALAXALIGN_ISA_NAME "x86-64-v4 + AVX512-BF16"
#include "simd_kernels.inc"
