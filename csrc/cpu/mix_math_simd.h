// The vector forms of mix_math.h's per-element rules, for the hand-vectorised tile of the
// CPU kernel (cpu/mix_images_cpu_kernel.cpp, in its avx2 and avx512 builds).
//
// Each function applies one scalar rule of mix_math.h to every lane of a 256- or 512-bit
// vector, with the same constants and the same order of operations, so that every lane holds
// the bits the scalar function returns: the tile and the portable loops agree bit for bit
// (tests/test_mixer.py checks the narrow stores against torch's rounding of the kernel's own
// float32 result, and NaN/inf bits against the base build).  Each rule is written here once
// per vector width; a change to a rule in mix_math.h has to be repeated here.
//
// This header is included by a file that is compiled once per instruction set, so its
// definitions live in that build's namespace (mixnn::cpu::MIXNN_CPU_ISA): the linker can then
// never keep the avx512 build's out-of-line copy of an inline function for the avx2 build.
#pragma once

#ifndef MIXNN_CPU_ISA
#error "include from a file compiled with -DMIXNN_CPU_ISA=<namespace>"
#endif

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "mix_math.h"

namespace mixnn {
namespace cpu {
namespace MIXNN_CPU_ISA {
namespace simd {

// ---- the mixing arithmetic, fused ------------------------------------------------------------
//
// mix_accumulate's `acc + weight * value` and mix_normalise's `weighted_sum - mean * weight_sum`
// are each one FMA here: one rounding, which is also what g++ compiles the scalar functions to
// in the FMA builds (-std=gnu++17 contracts them).  The float overloads are one lane of the
// vector forms, written with std::fma so that the avx2 tile's scalar tail rounds as its lanes
// do whatever the compiler's contraction setting.

// The vector form of mix_accumulate: acc + weight * value, fused.
inline float accumulate(float acc, float weight, float value) { return std::fma(weight, value, acc); }

// The vector form of mix_normalise: (weighted_sum - mean * weight_sum) * inv_std, the
// subtraction fused, then the multiply.
inline float normalise(float weighted_sum, float weight_sum, float mean, float inv_std) {
  return std::fma(-mean, weight_sum, weighted_sum) * inv_std;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

// ---- 256 bits, 8 lanes (AVX2, FMA, F16C) ---------------------------------------------------

inline __m256 accumulate(__m256 acc, __m256 weight, __m256 value) { return _mm256_fmadd_ps(weight, value, acc); }

inline __m256 normalise(__m256 weighted_sum, __m256 weight_sum, __m256 mean, __m256 inv_std) {
  return _mm256_mul_ps(_mm256_fnmadd_ps(mean, weight_sum, weighted_sum), inv_std);
}

// The vector form of from_float<BFloat16>: u + 0x7FFF + ((u >> 16) & 1), or u | 0x00400000 for a
// NaN (a quiet NaN with the top of its payload kept).  The bfloat16 bits are the high 16 bits of
// each 32-bit lane (the low 16 are left over from the rounding): callers shift or pick them out
// as their store needs.  may_nan = false skips the NaN select, for callers that have shown no
// lane can be NaN.
inline __m256i bfloat16_round(__m256 y, bool may_nan) {
  const __m256i u = _mm256_castps_si256(y);
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                               _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
  if (may_nan) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
  }
  return r;
}

// The vector form of from_float<Half>: vcvtps2ph rounds to nearest even, keeps subnormals exact
// and overflows to inf as the header's construction does; only NaN differs (vcvtps2ph keeps the
// payload's top bits), so a NaN is first replaced by sign | 0x7FC00000, which converts to the
// header's sign | 0x7E00.  may_nan = false skips that fix-up.
inline __m128i half_from_float(__m256 y, bool may_nan) {
  if (may_nan) {
    const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
    const __m256 canonical = _mm256_or_ps(_mm256_and_ps(y, _mm256_set1_ps(-0.0f)),
                                          _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
    y = _mm256_blendv_ps(y, canonical, nan);
  }
  return _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

#endif  // AVX2

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

// ---- 512 bits, 16 lanes (AVX-512 F/BW/VL) -------------------------------------------------------

inline __m512 accumulate(__m512 acc, __m512 weight, __m512 value) { return _mm512_fmadd_ps(weight, value, acc); }

inline __m512 normalise(__m512 weighted_sum, __m512 weight_sum, __m512 mean, __m512 inv_std) {
  return _mm512_mul_ps(_mm512_fnmadd_ps(mean, weight_sum, weighted_sum), inv_std);
}

// The vector form of from_float<BFloat16>, as the 256-bit one (bfloat16 bits in the high half
// of each 32-bit lane), with the ties-to-even + 1 as a masked add on the lanes whose bit 16 is
// set.
inline __m512i bfloat16_round(__m512 y, bool may_nan) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i base = _mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_mask_add_epi32(base, _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000)), base,
                                    _mm512_set1_epi32(1));
  if (may_nan) r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x00400000));
  return r;
}

// The vector form of from_float<Half>, as the 256-bit one.
inline __m256i half_from_float(__m512 y, bool may_nan) {
  if (may_nan) {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i canonical = _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(INT32_MIN)),
                                              _mm512_set1_epi32(0x7FC00000));
    y = _mm512_castsi512_ps(_mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), canonical));
  }
  return _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

#endif  // AVX-512

}  // namespace simd
}  // namespace MIXNN_CPU_ISA
}  // namespace cpu
}  // namespace mixnn
