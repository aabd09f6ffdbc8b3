// CPU kernels at the x86-64-v2 level (SSE4.2): the portable fallback every x86-64 CPU here runs.
#define GALAXALIGN_ISA isa_v2
#define GALAXALIGN_ISA_NAME "x86-64-v2 (SSE4.2)"
#include "simd_kernels.inc"
