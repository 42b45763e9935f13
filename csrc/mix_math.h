// Per-element arithmetic of the fused mixer, written once for the CPU and the GPU.
//
// Everything here is an inline function marked MIXNN_HD, which is
// `__host__ __device__` under nvcc and plain `inline` under g++, so the same
// source builds the OpenMP kernel, the CUDA kernel and the host emulation of the
// CUDA grid used by the tests (see DALI's water.h for the pattern).
//
// The half and bfloat16 conversions are bit manipulations rather than
// cuda_fp16.h intrinsics on purpose: one implementation, identical results on
// both devices, and g++ can vectorise them.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MIXNN_HD __host__ __device__ __forceinline__
#else
#define MIXNN_HD inline
#endif

namespace mixnn {

// Element types the mixer reads and writes; the codes are shared with Python
// (mixnn_fast/mix/mixer.py, _DTYPE_CODES).
enum class DType : int32_t { kUInt8 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Layout : int32_t { kNHWC = 0, kNCHW = 1 };

// 16-bit storage types; layout-compatible with torch.float16 / torch.bfloat16.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

// The CPU kernel's source is compiled once per instruction set (base, avx2, avx512) into one
// extension.  An inline function that g++ emits out of line would be a weak symbol of the same
// name in each object, and the linker would keep one copy -- possibly the AVX-512 one inside the
// kernel chosen for an AVX2-only CPU.  In those builds the functions below therefore live in an
// inline namespace named after the instruction set: one distinct copy per build, still called
// as mixnn::to_float etc.  (The types above are shared and stay outside it.)  mix_params.h
// wraps its helpers the same way.
#if defined(MIXNN_CPU_ISA) && !defined(__CUDACC__)
#define MIXNN_ISA_FUNCTIONS_BEGIN inline namespace MIXNN_CPU_ISA {
#define MIXNN_ISA_FUNCTIONS_END }
#else
#define MIXNN_ISA_FUNCTIONS_BEGIN
#define MIXNN_ISA_FUNCTIONS_END
#endif

MIXNN_ISA_FUNCTIONS_BEGIN

MIXNN_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MIXNN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---- loads: element -> float -------------------------------------------------

MIXNN_HD float to_float(uint8_t v) { return static_cast<float>(v); }
MIXNN_HD float to_float(float v) { return v; }
MIXNN_HD float to_float(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

// IEEE half -> float, exact for every input including subnormals, inf and NaN:
// normal numbers are re-biased by a multiply, subnormals built with a magic bias
// (the classic branch-free construction used by the FP16 library and c10::Half).
MIXNN_HD float to_float(Half v) {
  const uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

// ---- stores: float -> element, round to nearest even ---------------------------

template <typename T>
MIXNN_HD T from_float(float f);

template <>
MIXNN_HD float from_float<float>(float f) { return f; }

// Saturating, round half to even (as torch's round().clamp(0, 255)); NaN -> 0.  Written
// with selects, not branches, so the compiler can vectorise the loops that call it.
template <>
MIXNN_HD uint8_t from_float<uint8_t>(float f) {
  float clamped = f > 0.0f ? f : 0.0f;  // also maps NaN to 0
  clamped = clamped < 255.0f ? clamped : 255.0f;
  // Adding and subtracting 2^23 rounds to an integer in the current (nearest-even) mode.
  const float rounded = (clamped + 8388608.0f) - 8388608.0f;
  return static_cast<uint8_t>(rounded);
}

// Vector form (the CPU kernel's avx2/avx512 tile): bfloat16_round in cpu/mix_math_simd.h.
template <>
MIXNN_HD BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return BFloat16{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};  // a select, not a branch
}

// float -> IEEE half, round to nearest even, overflow to inf, subnormals exact:
// the FP16 library's construction (scale to push the rounding point to bit 13,
// then add a bias that makes the FPU do the rounding).  Vector form: half_from_float in
// cpu/mix_math_simd.h (F16C's conversion, which agrees but for NaN, plus this function's NaN).
template <>
MIXNN_HD Half from_float<Half>(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  float base = (bits_to_float(w & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// ---- the mixing arithmetic ---------------------------------------------------

// One term of the convex combination: acc + w * x.  Vector form: accumulate in cpu/mix_math_simd.h.
MIXNN_HD float mix_accumulate(float acc, float weight, float value) { return acc + weight * value; }

// Σ_j w_j (x_j - mean) / std  ==  (Σ_j w_j x_j - mean · Σ_j w_j) · (1/std).
// Normalising after the sum touches each output once instead of K+1 times; the
// weight sum keeps it exact when the weights do not sum to exactly 1.  Vector form: normalise in
// cpu/mix_math_simd.h.
MIXNN_HD float mix_normalise(float weighted_sum, float weight_sum, float mean, float inv_std) {
  return (weighted_sum - mean * weight_sum) * inv_std;
}

MIXNN_ISA_FUNCTIONS_END
}  // namespace mixnn
