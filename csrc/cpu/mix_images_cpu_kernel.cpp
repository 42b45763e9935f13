// CPU kernel of the fused mixer: gather, convex combination, normalisation,
// layout change and dtype cast in one pass over memory.
//
// This file is compiled once per instruction set (CMakeLists.txt): as
// MIXNN_CPU_ISA=base for any x86-64/other CPU, as MIXNN_CPU_ISA=avx2 with
// -mavx2 -mfma -mf16c, and as MIXNN_CPU_ISA=avx512 with AVX-512 F/BW/VL/DQ as well.
// mix_images_cpu.cpp picks one at run time, so the extension runs on every CPU
// without -march=native and still uses 256- or 512-bit vectors where they exist.
// The avx2 and avx512 builds add a hand-vectorised tile (intrinsics) for the
// common case, uint8 NHWC three-channel input to NCHW float32/bfloat16/float16.
//
// Each output row (one anchor) is cut into tiles of pixels.  For a tile, stage 1
// accumulates Σ_j w_j x_j over the K+1 source images into a small float buffer
// that stays in L1; stage 2 normalises the buffer and writes it out in the
// output layout and dtype.  Splitting the two stages lets each inner loop be a
// simple, vectorisable loop, and keeps the number of template instantiations at
// (input types × layouts) + (output types × layouts × channel cases) instead of
// their product.  Three-channel NHWC input headed for NCHW output (decoded
// images into a network) accumulates planar, de-interleaving the narrow input
// rather than the floats; at K = 1 one fused loop does both stages in registers.  The element
// arithmetic comes from mix_math.h, shared with the CUDA kernel, and for the vector tile from
// its vector forms in cpu/mix_math_simd.h.
#include "cpu/mix_images_cpu.h"

#ifndef MIXNN_CPU_ISA
#error "compile with -DMIXNN_CPU_ISA=<namespace>"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "dispatch.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include "cpu/mix_math_simd.h"  // the vector forms of mix_math.h's rules (and <immintrin.h>)
#endif

namespace mixnn {
namespace cpu {
namespace MIXNN_CPU_ISA {
namespace {

// Outputs of at least this many bytes are written with non-temporal stores (vector tile only).
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

// Accumulator floats per tile: 16 KiB, comfortably inside L1 with the inputs streaming past.
constexpr int64_t kTileFloats = 4096;

// Stage 1: acc[i] = Σ_j w_j x_j[i] over the tile's elements, in the input's own
// layout.  For NHWC the tile is one flat run of tile·C elements and for NCHW C
// runs of `tile`, so the inner loop is always a unit-stride multiply-add that
// the compiler vectorises; the layout change happens in stage 2, from L1.
template <typename Tin, Layout kInLayout>
void accumulate_tile(const void* const* sources, const float* weights, int64_t terms, int64_t pixel0,
                     int64_t tile, int64_t pixels, int64_t channels, float* __restrict acc) {
  const int64_t runs = kInLayout == Layout::kNHWC ? 1 : channels;
  const int64_t run_length = kInLayout == Layout::kNHWC ? tile * channels : tile;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t start = kInLayout == Layout::kNHWC ? pixel0 * channels : r * pixels + pixel0;
    float* __restrict a = acc + r * run_length;
    {
      const Tin* __restrict s = static_cast<const Tin*>(sources[0]) + start;
      const float w = weights[0];
      for (int64_t i = 0; i < run_length; ++i) a[i] = w * to_float(s[i]);
    }
    for (int64_t j = 1; j < terms; ++j) {
      const Tin* __restrict s = static_cast<const Tin*>(sources[j]) + start;
      const float w = weights[j];
      for (int64_t i = 0; i < run_length; ++i) a[i] = mix_accumulate(a[i], w, to_float(s[i]));
    }
  }
}

// Stage 1 for three-channel NHWC input into an NCHW-ordered (planar) accumulator: the
// de-interleave happens on the narrow input type, where a vector holds 4x more elements
// than in float, so that stage 2 writes NCHW output with unit-stride loops.
template <typename Tin>
void accumulate_tile_nhwc3_planar(const void* const* sources, const float* weights, int64_t terms, int64_t pixel0,
                                  int64_t tile, int64_t /*pixels*/, int64_t /*channels*/, float* __restrict acc) {
  float* __restrict a0 = acc;
  float* __restrict a1 = acc + tile;
  float* __restrict a2 = acc + 2 * tile;
  for (int64_t j = 0; j < terms; ++j) {
    const Tin* __restrict s = static_cast<const Tin*>(sources[j]) + pixel0 * 3;
    const float w = weights[j];
    if (j == 0) {
      for (int64_t t = 0; t < tile; ++t) {
        a0[t] = w * to_float(s[3 * t]);
        a1[t] = w * to_float(s[3 * t + 1]);
        a2[t] = w * to_float(s[3 * t + 2]);
      }
    } else {
      for (int64_t t = 0; t < tile; ++t) {
        a0[t] = mix_accumulate(a0[t], w, to_float(s[3 * t]));
        a1[t] = mix_accumulate(a1[t], w, to_float(s[3 * t + 1]));
        a2[t] = mix_accumulate(a2[t], w, to_float(s[3 * t + 2]));
      }
    }
  }
}

// Both stages in one loop, for the common case of three-channel NHWC input, NCHW output and
// K = 1: the sums stay in registers instead of making a round trip through the L1
// accumulator.  Same arithmetic, same order of operations as the two-stage path.
template <typename Tin, typename Tout>
void mix_tile_nhwc3_to_nchw(const void* const* sources, const float* weights, float weight_sum, const float* mean,
                            const float* inv_std, int64_t pixel0, int64_t tile, int64_t pixels, void* out_row) {
  // Plain local pointers and scalars (no arrays): GCC 12 then proves the streams independent
  // and vectorises the pixel loop for every output type.
  const Tin* __restrict s0 = static_cast<const Tin*>(sources[0]) + pixel0 * 3;
  const Tin* __restrict s1 = static_cast<const Tin*>(sources[1]) + pixel0 * 3;
  const float w0 = weights[0], w1 = weights[1];
  Tout* __restrict o0 = static_cast<Tout*>(out_row) + pixel0;
  Tout* __restrict o1 = o0 + pixels;
  Tout* __restrict o2 = o1 + pixels;
  const float m0 = mean[0], m1 = mean[1], m2 = mean[2];
  const float i0 = inv_std[0], i1 = inv_std[1], i2 = inv_std[2];
  for (int64_t t = 0; t < tile; ++t) {
    const float a0 = mix_accumulate(w0 * to_float(s0[3 * t]), w1, to_float(s1[3 * t]));
    const float a1 = mix_accumulate(w0 * to_float(s0[3 * t + 1]), w1, to_float(s1[3 * t + 1]));
    const float a2 = mix_accumulate(w0 * to_float(s0[3 * t + 2]), w1, to_float(s1[3 * t + 2]));
    o0[t] = from_float<Tout>(mix_normalise(a0, weight_sum, m0, i0));
    o1[t] = from_float<Tout>(mix_normalise(a1, weight_sum, m1, i1));
    o2[t] = from_float<Tout>(mix_normalise(a2, weight_sum, m2, i2));
  }
}

// Stage 2: normalise the tile's sums and write them in the output layout and
// dtype.  `acc` is in the input layout (kAccLayout); kChannels > 0 fixes C at
// compile time (1 and 3 are the common cases: the channel loop unrolls), 0 reads
// it at run time.
template <typename Tout, int kChannels, Layout kAccLayout, Layout kOutLayout>
void store_tile(const float* __restrict acc, float weight_sum, const float* mean, const float* inv_std,
                int64_t pixel0, int64_t tile, int64_t pixels, int64_t channels_rt, void* out_row) {
  const int64_t C = kChannels > 0 ? kChannels : channels_rt;
  Tout* __restrict out = static_cast<Tout*>(out_row);
  // Position of (pixel t, channel c) in the accumulator.
  auto at = [&](int64_t t, int64_t c) { return kAccLayout == Layout::kNHWC ? t * C + c : c * tile + t; };
  if (kOutLayout == Layout::kNCHW) {
    for (int64_t c = 0; c < C; ++c) {
      const float m = mean[c], s = inv_std[c];
      Tout* __restrict o = out + c * pixels + pixel0;
      for (int64_t t = 0; t < tile; ++t) o[t] = from_float<Tout>(mix_normalise(acc[at(t, c)], weight_sum, m, s));
    }
  } else {
    Tout* __restrict o = out + pixel0 * C;
    for (int64_t t = 0; t < tile; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        o[t * C + c] = from_float<Tout>(mix_normalise(acc[at(t, c)], weight_sum, mean[c], inv_std[c]));
      }
    }
  }
}

// The hand-vectorised tile's signature (nullptr where this build has none).
using SimdTileFn = void (*)(const void* const*, const float*, int64_t, float, const float*, const float*, int64_t,
                            int64_t, int64_t, void*);

// ---- hand-vectorised path: three-channel uint8 NHWC in, NCHW out (decoded images into a network) ----
//
// The weights are per image, not per channel, so the sum Σ_j w_j x_j can be accumulated in the
// interleaved NHWC order straight from the bytes (one zero-extend + convert + FMA per vector and
// source, no shuffle), and the de-interleave to planar happens once per pixel group, on the
// floats, after the last source: for channel c, element 3t+c of the group's 3V floats sits in
// vector (3t+c)/V at lane (3t+c)%V, and because 3 is coprime with V every lane holds exactly one
// element of channel c, so two blends and one lane permute give the channel's V values.  The
// arithmetic is the scalar path's, in the same order (w_0 x_0, then + w_j x_j as one FMA, then
// (sum - mean * weight_sum) * inv_std as FMA and multiply), and the narrow stores round as
// mix_math.h's from_float: all of it through the vector forms of those rules in
// cpu/mix_math_simd.h, so the results do not depend on which path ran.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MIXNN_SIMD_NHWC3 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MIXNN_SIMD_NHWC3 256
#endif

#if defined(MIXNN_SIMD_NHWC3)

// Lane tables of the de-interleave for V lanes: perm[c][t] = (3t + c) % V, and bit p of
// from1[c] / from2[c] is set when lane p of channel c's blend comes from vector 1 / vector 2.
template <int V>
struct Deinterleave3 {
  int32_t perm[3][V];
  uint32_t from1[3];
  uint32_t from2[3];
  constexpr Deinterleave3() : perm{}, from1{}, from2{} {
    for (int c = 0; c < 3; ++c) {
      for (int t = 0; t < V; ++t) {
        const int e = 3 * t + c;
        perm[c][t] = e % V;
        if (e / V == 1) from1[c] |= 1u << (e % V);
        if (e / V == 2) from2[c] |= 1u << (e % V);
      }
    }
  }
};

#if MIXNN_SIMD_NHWC3 == 512
constexpr int kLanes = 16;
using VecF = __m512;
constexpr Deinterleave3<16> kDeinterleave{};

// The same de-interleave on 16-bit words, 32 lanes: for bfloat16 and float16 output the tile
// narrows first, in the interleaved order, and moves half as many bytes through the shuffles.
struct Deinterleave3Words {
  int16_t perm[3][32];
  uint32_t from1[3];
  uint32_t from2[3];
  int16_t odd[32];  // word 2i+1 of (a, b): the high halves of 32 32-bit lanes
  constexpr Deinterleave3Words() : perm{}, from1{}, from2{}, odd{} {
    constexpr Deinterleave3<32> d{};
    for (int c = 0; c < 3; ++c) {
      for (int t = 0; t < 32; ++t) perm[c][t] = static_cast<int16_t>(d.perm[c][t]);
      from1[c] = d.from1[c];
      from2[c] = d.from2[c];
    }
    for (int i = 0; i < 32; ++i) odd[i] = static_cast<int16_t>(2 * i + 1);
  }
};
constexpr Deinterleave3Words kDeinterleaveWords{};

inline __m512i planar_words(int c, __m512i w0, __m512i w1, __m512i w2) {
  __m512i b = _mm512_mask_blend_epi16(kDeinterleaveWords.from1[c], w0, w1);
  b = _mm512_mask_blend_epi16(kDeinterleaveWords.from2[c], b, w2);
  return _mm512_permutexvar_epi16(_mm512_loadu_si512(kDeinterleaveWords.perm[c]), b);
}

// 32 narrow values, in order, from two vectors of 16 floats (bfloat16: the high words of the
// rounded 32-bit lanes).
inline __m512i narrow_pair(BFloat16*, __m512 y0, __m512 y1, bool may_nan) {
  return _mm512_permutex2var_epi16(simd::bfloat16_round(y0, may_nan), _mm512_loadu_si512(kDeinterleaveWords.odd),
                                   simd::bfloat16_round(y1, may_nan));
}
inline __m512i narrow_pair(Half*, __m512 y0, __m512 y1, bool may_nan) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(simd::half_from_float(y0, may_nan)),
                            simd::half_from_float(y1, may_nan), 1);
}
template <bool kStream>
inline void store_words(void* o, __m512i v) {
  if (kStream) {
    _mm512_stream_si512(static_cast<__m512i*>(o), v);
  } else {
    _mm512_storeu_si512(o, v);
  }
}

// Three vectors of 16 floats from 48 bytes (masked: only the first `valid` bytes are read).
inline void load_u8x48(const uint8_t* s, VecF& x0, VecF& x1, VecF& x2) {
  x0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
  x1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16))));
  x2 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32))));
}
inline void load_u8x48_partial(const uint8_t* s, uint64_t byte_mask, VecF& x0, VecF& x1, VecF& x2) {
  x0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(byte_mask), s)));
  x1 = _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(byte_mask >> 16), s + 16)));
  x2 = _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(byte_mask >> 32), s + 32)));
}
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vset1(float f) { return _mm512_set1_ps(f); }
inline VecF planar(int c, VecF v0, VecF v1, VecF v2) {
  VecF b = _mm512_mask_blend_ps(static_cast<__mmask16>(kDeinterleave.from1[c]), v0, v1);
  b = _mm512_mask_blend_ps(static_cast<__mmask16>(kDeinterleave.from2[c]), b, v2);
  return _mm512_permutexvar_ps(_mm512_loadu_si512(kDeinterleave.perm[c]), b);
}
// Stores of `count` (<= 16) values; count == 16 is the full, unmasked store, non-temporal
// (kStream, o aligned to the store's width) or not.
template <bool kStream = false>
inline void store_vec(float* o, VecF y, int count) {
  if (count == kLanes) {
    if (kStream) {
      _mm512_stream_ps(o, y);
    } else {
      _mm512_storeu_ps(o, y);
    }
  } else {
    _mm512_mask_storeu_ps(o, static_cast<__mmask16>((1u << count) - 1), y);
  }
}
// The first `count` of 16 narrow values (bfloat16 or float16 bits) to o.
template <bool kStream, typename T16>
inline void store_words16(T16* o, __m256i h, int count) {
  if (count == kLanes) {
    if (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(o), h);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h);
    }
  } else {
    _mm256_mask_storeu_epi16(o, static_cast<__mmask16>((1u << count) - 1), h);
  }
}
template <bool kStream = false>
inline void store_vec(BFloat16* o, VecF y, int count) {
  store_words16<kStream>(o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(simd::bfloat16_round(y, true), 16)), count);
}
template <bool kStream = false>
inline void store_vec(Half* o, VecF y, int count) {
  store_words16<kStream>(o, simd::half_from_float(y, true), count);
}

#else  // MIXNN_SIMD_NHWC3 == 256
constexpr int kLanes = 8;
using VecF = __m256;
constexpr Deinterleave3<8> kDeinterleave{};

inline VecF load_u8x8(const uint8_t* s) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))));
}
inline void load_u8x24(const uint8_t* s, VecF& x0, VecF& x1, VecF& x2) {
  x0 = load_u8x8(s);
  x1 = load_u8x8(s + 8);
  x2 = load_u8x8(s + 16);
}
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vset1(float f) { return _mm256_set1_ps(f); }
template <int c>
inline VecF planar(VecF v0, VecF v1, VecF v2) {
  VecF b = _mm256_blend_ps(v0, v1, static_cast<int>(kDeinterleave.from1[c]));
  b = _mm256_blend_ps(b, v2, static_cast<int>(kDeinterleave.from2[c]));
  return _mm256_permutevar8x32_ps(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kDeinterleave.perm[c])));
}
template <bool kStream = false>
inline void store_vec(float* o, VecF y) {
  if (kStream) {
    _mm256_stream_ps(o, y);
  } else {
    _mm256_storeu_ps(o, y);
  }
}
template <bool kStream = false>
inline void store128(void* o, __m128i h) {
  if (kStream) {
    _mm_stream_si128(static_cast<__m128i*>(o), h);
  } else {
    _mm_storeu_si128(static_cast<__m128i*>(o), h);
  }
}
// The bfloat16 bits of 8 floats, in the low half of each 32-bit lane.
inline __m256i bf16_bits(VecF y, bool may_nan) { return _mm256_srli_epi32(simd::bfloat16_round(y, may_nan), 16); }
template <bool kStream = false>
inline void store_vec(BFloat16* o, VecF y) {
  const __m256i r = bf16_bits(y, true);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // lanes 0 and 2
  store128<kStream>(o, _mm256_castsi256_si128(packed));
}
// 16 narrow values from two vectors of 8 floats, one 256-bit store (o aligned to 32 bytes when
// kStream).
template <bool kStream>
inline void store256(void* o, __m256i v) {
  if (kStream) {
    _mm256_stream_si256(static_cast<__m256i*>(o), v);
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(o), v);
  }
}
template <bool kStream>
inline void store_pair(BFloat16* o, VecF y0, VecF y1, bool may_nan) {
  const __m256i packed = _mm256_packus_epi32(bf16_bits(y0, may_nan), bf16_bits(y1, may_nan));
  store256<kStream>(o, _mm256_permute4x64_epi64(packed, 0xD8));  // 64-bit lanes 0 2 1 3: in order
}
template <bool kStream>
inline void store_pair(Half* o, VecF y0, VecF y1, bool may_nan) {
  store256<kStream>(o, _mm256_set_m128i(simd::half_from_float(y1, may_nan), simd::half_from_float(y0, may_nan)));
}
template <bool kStream>
inline void store_pair(float*, VecF, VecF, bool) {}

template <bool kStream = false>
inline void store_vec(Half* o, VecF y) {
  store128<kStream>(o, simd::half_from_float(y, true));
}
#endif

// The 3·kLanes interleaved bytes of one pixel group (kLanes pixels × 3 channels) as three
// vectors, full or under a byte mask.
struct LoadGroup {
  inline void operator()(const uint8_t* s, VecF& x0, VecF& x1, VecF& x2) const {
#if MIXNN_SIMD_NHWC3 == 512
    load_u8x48(s, x0, x1, x2);
#else
    load_u8x24(s, x0, x1, x2);
#endif
  }
};

// a[3g .. 3g+2] = Σ_j w_j · x_j over pixel group g (g < kGroups) starting at byte `offset` of
// every source, accumulated as the portable kernel does (w_0 x_0, then one fma per term), so
// every tile rounds alike; the groups of one source are loaded together.
template <int kGroups, typename Load>
inline void accumulate_groups(const uint8_t* const* src, int64_t offset, const VecF* w, int64_t terms,
                              const Load& load, VecF* a) {
  VecF x[3 * kGroups];
  for (int g = 0; g < kGroups; ++g) load(src[0] + offset + 3 * kLanes * g, x[3 * g], x[3 * g + 1], x[3 * g + 2]);
  for (int i = 0; i < 3 * kGroups; ++i) a[i] = vmul(w[0], x[i]);
  for (int64_t j = 1; j < terms; ++j) {
    for (int g = 0; g < kGroups; ++g) load(src[j] + offset + 3 * kLanes * g, x[3 * g], x[3 * g + 1], x[3 * g + 2]);
    for (int i = 0; i < 3 * kGroups; ++i) a[i] = simd::accumulate(a[i], w[j], x[i]);
  }
}

// One tile of an NHWC uint8 C=3 -> NCHW row.  kTerms > 0 fixes the number of sources at
// compile time (the loop over them unrolls), 0 reads `terms`.
template <int kTerms, typename Tout, bool kStream>
void mix_tile_u8x3_simd(const void* const* sources, const float* weights, int64_t terms_rt, float weight_sum,
                        const float* mean, const float* inv_std, int64_t pixel0, int64_t tile, int64_t pixels,
                        void* out_row) {
  constexpr int kMaxTerms = 16;
  const int64_t terms = kTerms > 0 ? kTerms : terms_rt;
  const uint8_t* src[kMaxTerms];
  VecF w[kMaxTerms];
  for (int64_t j = 0; j < terms; ++j) {
    src[j] = static_cast<const uint8_t*>(sources[j]) + pixel0 * 3;
    w[j] = vset1(weights[j]);
  }
  Tout* o0 = static_cast<Tout*>(out_row) + pixel0;
  Tout* o1 = o0 + pixels;
  Tout* o2 = o1 + pixels;
  const VecF ws = vset1(weight_sum);
  const VecF m0 = vset1(mean[0]), m1 = vset1(mean[1]), m2 = vset1(mean[2]);
  const VecF s0 = vset1(inv_std[0]), s1 = vset1(inv_std[1]), s2 = vset1(inv_std[2]);

  // The narrow stores' NaN fix-up runs only if a NaN is possible: with uint8 inputs the result
  // is bounded by (255 sum|w_j| + max|mean| |weight_sum|) max inv_std.
  float sum_abs_w = 0.0f;
  for (int64_t j = 0; j < terms; ++j) sum_abs_w += std::fabs(weights[j]);
  float max_mean = 0.0f, max_inv_std = 0.0f;
  for (int c = 0; c < 3; ++c) {
    max_mean = std::max(max_mean, std::fabs(mean[c]));
    max_inv_std = std::max(max_inv_std, std::fabs(inv_std[c]));
  }
  const double bound = (255.0 * sum_abs_w + static_cast<double>(max_mean) * std::fabs(weight_sum)) * max_inv_std;
  const bool may_nan = !(bound < 1e37);  // also true when any of them is NaN or inf
  (void)may_nan;

  int64_t t = 0;
#if MIXNN_SIMD_NHWC3 == 512
  if constexpr (!std::is_same<Tout, float>::value) {
    // 32 pixels a step: accumulate six interleaved vectors, normalise them in that order (the
    // channel of lane l of vector i is (i + l) % 3, since 16 = 1 mod 3), narrow pairs to 32
    // words, and de-interleave the words.
    alignas(64) float mp[3][16], sp[3][16];
    for (int r = 0; r < 3; ++r) {
      for (int l = 0; l < 16; ++l) {
        mp[r][l] = mean[(r + l) % 3];
        sp[r][l] = inv_std[(r + l) % 3];
      }
    }
    const VecF mpat[3] = {_mm512_load_ps(mp[0]), _mm512_load_ps(mp[1]), _mm512_load_ps(mp[2])};
    const VecF spat[3] = {_mm512_load_ps(sp[0]), _mm512_load_ps(sp[1]), _mm512_load_ps(sp[2])};
    for (; t + 2 * kLanes <= tile; t += 2 * kLanes) {
      VecF a[6];
      accumulate_groups<2>(src, 3 * t, w, terms, LoadGroup{}, a);
      __m512i words[3];
      for (int k = 0; k < 3; ++k) {
        const VecF y0 = simd::normalise(a[2 * k], ws, mpat[(2 * k) % 3], spat[(2 * k) % 3]);
        const VecF y1 = simd::normalise(a[2 * k + 1], ws, mpat[(2 * k + 1) % 3], spat[(2 * k + 1) % 3]);
        words[k] = narrow_pair(static_cast<Tout*>(nullptr), y0, y1, may_nan);
      }
      store_words<kStream>(o0 + t, planar_words(0, words[0], words[1], words[2]));
      store_words<kStream>(o1 + t, planar_words(1, words[0], words[1], words[2]));
      store_words<kStream>(o2 + t, planar_words(2, words[0], words[1], words[2]));
    }
  }
#endif
#if MIXNN_SIMD_NHWC3 == 256
  if constexpr (!std::is_same<Tout, float>::value) {
    // 16 pixels a step, two 8-pixel groups, so that one 256-bit store takes 16 narrow values
    // of a channel.
    for (; t + 2 * kLanes <= tile; t += 2 * kLanes) {
      VecF a[6];
      accumulate_groups<2>(src, 3 * t, w, terms, LoadGroup{}, a);
      const VecF ya0 = simd::normalise(planar<0>(a[0], a[1], a[2]), ws, m0, s0);
      const VecF ya1 = simd::normalise(planar<1>(a[0], a[1], a[2]), ws, m1, s1);
      const VecF ya2 = simd::normalise(planar<2>(a[0], a[1], a[2]), ws, m2, s2);
      const VecF yb0 = simd::normalise(planar<0>(a[3], a[4], a[5]), ws, m0, s0);
      const VecF yb1 = simd::normalise(planar<1>(a[3], a[4], a[5]), ws, m1, s1);
      const VecF yb2 = simd::normalise(planar<2>(a[3], a[4], a[5]), ws, m2, s2);
      store_pair<kStream>(o0 + t, ya0, yb0, may_nan);
      store_pair<kStream>(o1 + t, ya1, yb1, may_nan);
      store_pair<kStream>(o2 + t, ya2, yb2, may_nan);
    }
  }
#endif
  for (; t + kLanes <= tile; t += kLanes) {
    VecF a[3];
    accumulate_groups<1>(src, 3 * t, w, terms, LoadGroup{}, a);
#if MIXNN_SIMD_NHWC3 == 512
    const VecF p0 = planar(0, a[0], a[1], a[2]), p1 = planar(1, a[0], a[1], a[2]), p2 = planar(2, a[0], a[1], a[2]);
    store_vec<kStream>(o0 + t, simd::normalise(p0, ws, m0, s0), kLanes);
    store_vec<kStream>(o1 + t, simd::normalise(p1, ws, m1, s1), kLanes);
    store_vec<kStream>(o2 + t, simd::normalise(p2, ws, m2, s2), kLanes);
#else
    const VecF p0 = planar<0>(a[0], a[1], a[2]), p1 = planar<1>(a[0], a[1], a[2]), p2 = planar<2>(a[0], a[1], a[2]);
    store_vec<kStream>(o0 + t, simd::normalise(p0, ws, m0, s0));
    store_vec<kStream>(o1 + t, simd::normalise(p1, ws, m1, s1));
    store_vec<kStream>(o2 + t, simd::normalise(p2, ws, m2, s2));
#endif
  }
  if (t == tile) return;
#if MIXNN_SIMD_NHWC3 == 512
  // The last < 16 pixels with masked loads and stores.
  const int count = static_cast<int>(tile - t);
  const uint64_t byte_mask = (uint64_t{1} << (3 * count)) - 1;
  const auto load_partial = [byte_mask](const uint8_t* s, VecF& x0, VecF& x1, VecF& x2) {
    load_u8x48_partial(s, byte_mask, x0, x1, x2);
  };
  VecF a[3];
  accumulate_groups<1>(src, 3 * t, w, terms, load_partial, a);
  const VecF p0 = planar(0, a[0], a[1], a[2]), p1 = planar(1, a[0], a[1], a[2]), p2 = planar(2, a[0], a[1], a[2]);
  store_vec(o0 + t, simd::normalise(p0, ws, m0, s0), count);
  store_vec(o1 + t, simd::normalise(p1, ws, m1, s1), count);
  store_vec(o2 + t, simd::normalise(p2, ws, m2, s2), count);
#else
  // The last < 8 pixels, scalar: one lane of the same fused operations, so the same rounding.
  for (; t < tile; ++t) {
    for (int c = 0; c < 3; ++c) {
      float a = weights[0] * to_float(src[0][3 * t + c]);
      for (int64_t j = 1; j < terms; ++j) a = simd::accumulate(a, weights[j], to_float(src[j][3 * t + c]));
      const float y = simd::normalise(a, weight_sum, mean[c], inv_std[c]);
      (c == 0 ? o0 : c == 1 ? o1 : o2)[t] = from_float<Tout>(y);
    }
  }
#endif
}

template <typename Tout, bool kStream>
SimdTileFn pick_simd_tile(int64_t terms) {
  switch (terms) {
    case 1: return mix_tile_u8x3_simd<1, Tout, kStream>;
    case 2: return mix_tile_u8x3_simd<2, Tout, kStream>;
    case 3: return mix_tile_u8x3_simd<3, Tout, kStream>;
    case 5: return mix_tile_u8x3_simd<5, Tout, kStream>;
    default: return terms <= 16 ? mix_tile_u8x3_simd<0, Tout, kStream> : nullptr;
  }
}

// Bytes of one full-width vector store of Tout (the alignment a non-temporal store needs).
// (Narrow outputs are stored two vectors' worth at a time.)
template <typename Tout>
constexpr int64_t vector_store_bytes() {
  return (sizeof(Tout) == 2 ? 2 : 1) * kLanes * static_cast<int64_t>(sizeof(Tout));
}

#endif  // MIXNN_SIMD_NHWC3

using FusedFn = void (*)(const void* const*, const float*, float, const float*, const float*, int64_t, int64_t,
                        int64_t, void*);
using AccumulateFn = void (*)(const void* const*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                              float*);
using StoreFn = void (*)(const float*, float, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                         void*);

template <typename Tin>
AccumulateFn pick_accumulate(Layout layout) {
  return layout == Layout::kNHWC ? accumulate_tile<Tin, Layout::kNHWC> : accumulate_tile<Tin, Layout::kNCHW>;
}

template <typename Tout, Layout kAccLayout>
StoreFn pick_store_for(Layout out_layout, int64_t channels) {
  const bool nchw = out_layout == Layout::kNCHW;
  if (channels == 3) {
    return nchw ? store_tile<Tout, 3, kAccLayout, Layout::kNCHW> : store_tile<Tout, 3, kAccLayout, Layout::kNHWC>;
  }
  if (channels == 1) {
    return nchw ? store_tile<Tout, 1, kAccLayout, Layout::kNCHW> : store_tile<Tout, 1, kAccLayout, Layout::kNHWC>;
  }
  return nchw ? store_tile<Tout, 0, kAccLayout, Layout::kNCHW> : store_tile<Tout, 0, kAccLayout, Layout::kNHWC>;
}

template <typename Tout>
StoreFn pick_store(Layout acc_layout, Layout out_layout, int64_t channels) {
  return acc_layout == Layout::kNHWC ? pick_store_for<Tout, Layout::kNHWC>(out_layout, channels)
                                     : pick_store_for<Tout, Layout::kNCHW>(out_layout, channels);
}

// Whether the first and last page of the output are resident.  A reused buffer is: streaming
// stores then save the read-for-ownership of every line (one thread, B = 64, float32 K = 1:
// 4.9 -> 2.4 ms).  A freshly allocated large tensor is not: each first touch faults in a page
// that the kernel has just zeroed through the cache, where ordinary stores hit and streaming
// ones must evict it (18 -> 24 ms measured).  mincore answers this in two system calls.
bool output_pages_mapped(const void* out, int64_t bytes) {
#if defined(__linux__)
  const long page_size = sysconf(_SC_PAGESIZE);
  if (page_size <= 0 || bytes <= 0) return false;
  const uintptr_t page = static_cast<uintptr_t>(page_size);
  const uintptr_t first = reinterpret_cast<uintptr_t>(out) & ~(page - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>(bytes) - 1) & ~(page - 1);
  for (const uintptr_t address : {first, last}) {
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(address), page, &resident) != 0 || (resident & 1) == 0) return false;
  }
  return true;
#else
  (void)out;
  (void)bytes;
  return true;
#endif
}

int64_t element_size(DType dtype) {
  return dispatch_dtype(dtype, "dtype", [](auto tag) -> int64_t { return sizeof(typename decltype(tag)::type); });
}

}  // namespace

void mix_images(const MixImagesParams& p, int num_threads) {
  const int64_t pixels = pixels_per_image(p);
  const int64_t C = p.channels;
  if (p.batch == 0 || pixels == 0 || C == 0) return;

  // Three-channel NHWC input with NCHW output (decoded images into a network) accumulates
  // planar; everything else accumulates in the input's own layout.
  const bool planar3 = p.in_layout == Layout::kNHWC && C == 3 && p.out_layout == Layout::kNCHW;
  const Layout acc_layout = planar3 ? Layout::kNCHW : p.in_layout;
  const AccumulateFn accumulate = dispatch_dtype(p.in_dtype, "images", [&](auto tag) {
    using Tin = typename decltype(tag)::type;
    return planar3 ? accumulate_tile_nhwc3_planar<Tin> : pick_accumulate<Tin>(p.in_layout);
  });
  const StoreFn store = dispatch_dtype(p.out_dtype, "out_dtype", [&](auto tag) {
    return pick_store<typename decltype(tag)::type>(acc_layout, p.out_layout, C);
  });
  // The fused tile at K = 1 (measured faster than the two stages for float32 and bfloat16).
  // A fused loop at K = 2, reading three interleaved streams, measured 2x slower than the two
  // stages (39 vs 20 ms), so K >= 2 keeps the two stages.
  FusedFn fused = nullptr;
  if (planar3 && p.num_partners == 1) {
    fused = dispatch_in_out(p.in_dtype, p.out_dtype, [&](auto in_tag, auto out_tag) -> FusedFn {
      return mix_tile_nhwc3_to_nchw<typename decltype(in_tag)::type, typename decltype(out_tag)::type>;
    });
  }

  // The hand-vectorised tile, where this build has one: uint8 NHWC C=3 in, NCHW float32,
  // bfloat16 or float16 out, any K (uint8 output keeps the portable path).
  SimdTileFn simd = nullptr, simd_stream = nullptr;
  int64_t stream_align = 0;
#if defined(MIXNN_SIMD_NHWC3)
  if (planar3 && p.in_dtype == DType::kUInt8) {
    switch (p.out_dtype) {
      case DType::kFloat32:
        simd = pick_simd_tile<float, false>(p.num_partners + 1);
        simd_stream = pick_simd_tile<float, true>(p.num_partners + 1);
        stream_align = vector_store_bytes<float>();
        break;
      case DType::kBFloat16:
        simd = pick_simd_tile<BFloat16, false>(p.num_partners + 1);
        simd_stream = pick_simd_tile<BFloat16, true>(p.num_partners + 1);
        stream_align = vector_store_bytes<BFloat16>();
        break;
      case DType::kFloat16:
        simd = pick_simd_tile<Half, false>(p.num_partners + 1);
        simd_stream = pick_simd_tile<Half, true>(p.num_partners + 1);
        stream_align = vector_store_bytes<Half>();
        break;
      default: break;
    }
  }
#endif
  // Non-temporal stores for outputs too large to stay in cache for their consumer: they skip
  // the read-for-ownership of every output line.  Used per tile, where the three planes are
  // aligned to the vector store, and only when the output's pages are already mapped (see
  // output_pages_mapped).
  const int64_t out_bytes = p.batch * pixels * C * element_size(p.out_dtype);
  const bool use_stream = simd_stream != nullptr && out_bytes >= kStreamMinBytes &&
                          output_pages_mapped(p.out, out_bytes);

  // Tiles of a whole number of 32-pixel groups (the vector loops have no tail but the row's).
  int64_t tile = std::max<int64_t>(1, std::min<int64_t>(pixels, kTileFloats / C));
  if (tile >= 32 && tile < pixels) tile -= tile % 32;
  const int64_t tiles_per_row = (pixels + tile - 1) / tile;
  const int64_t work_items = p.batch * tiles_per_row;
  const int64_t terms = p.num_partners + 1;
  const int64_t in_image_bytes = pixels * C * element_size(p.in_dtype);
  const int64_t out_row_bytes = pixels * C * element_size(p.out_dtype);
  const char* images = static_cast<const char*>(p.images);
  char* out = static_cast<char*>(p.out);

#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<float> acc(static_cast<size_t>(tile * C));
    std::vector<const void*> sources(static_cast<size_t>(terms));
    std::vector<float> weights(static_cast<size_t>(terms));
    int64_t current_row = -1;
    float weight_sum = 0.0f;
    // Static schedule: each thread takes a contiguous run of (row, tile) items,
    // so consecutive tiles of a row stay on one core.
#pragma omp for schedule(static)
    for (int64_t item = 0; item < work_items; ++item) {
      const int64_t row = item / tiles_per_row;
      const int64_t pixel0 = (item % tiles_per_row) * tile;
      if (row != current_row) {
        current_row = row;
        weight_sum = 0.0f;
        for (int64_t j = 0; j < terms; ++j) {
          sources[j] = images + term_index(p, row, j) * in_image_bytes;
          weights[j] = term_weight(p, row, j);
          weight_sum += weights[j];
        }
      }
      const int64_t n = std::min(tile, pixels - pixel0);
      if (simd != nullptr) {
        char* out_row = out + row * out_row_bytes;
        const int64_t plane_bytes = out_row_bytes / 3;
        const uintptr_t first = reinterpret_cast<uintptr_t>(out_row) + pixel0 * (out_row_bytes / (3 * pixels));
        const bool aligned = first % stream_align == 0 && plane_bytes % stream_align == 0;
        (use_stream && aligned ? simd_stream : simd)(sources.data(), weights.data(), terms, weight_sum, p.mean,
                                                      p.inv_std, pixel0, n, pixels, out_row);
        continue;
      }
      if (fused != nullptr) {
        fused(sources.data(), weights.data(), weight_sum, p.mean, p.inv_std, pixel0, n, pixels,
              out + row * out_row_bytes);
        continue;
      }
      accumulate(sources.data(), weights.data(), terms, pixel0, n, pixels, C, acc.data());
      store(acc.data(), weight_sum, p.mean, p.inv_std, pixel0, n, pixels, C, out + row * out_row_bytes);
    }
#if defined(MIXNN_SIMD_NHWC3)
    // Non-temporal stores are weakly ordered: make them visible before the threads join.
    if (use_stream) _mm_sfence();
#endif
  }
}

}  // namespace MIXNN_CPU_ISA
}  // namespace cpu
}  // namespace mixnn
