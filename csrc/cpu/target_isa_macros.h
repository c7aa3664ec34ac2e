// The ISA macros of a kernel file compiled under `#pragma GCC target(...)`
// (bn_act_kernels_x86_avx2.cpp, bn_act_kernels_x86_avx512.cpp): g++ does not define them for a
// target pragma (gcc does), and sleef.h, which ATen's AVX2 and AVX512 Vectorized include,
// declares its functions only under them. Include it right after the pragma; define
// FUSEDRES_TARGET_AVX512 first for the AVX512 set on top of the AVX2 one.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif

#ifdef FUSEDRES_TARGET_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
