// CPU kernel of the fused mixer: gather, convex combination, normalisation,
// layout change and dtype cast in one pass over memory.
//
// This file is compiled once per instruction set (CMakeLists.txt): as
// MIXNN_CPU_ISA=base for any x86-64/other CPU, and as MIXNN_CPU_ISA=avx2 with
// -mavx2 -mfma.  mix_images_cpu.cpp picks one at run time, so the extension
// runs on every CPU without -march=native and still uses 256-bit vectors where
// they exist.
//
// Each output row (one anchor) is cut into tiles of pixels.  For a tile, stage 1
// accumulates Σ_j w_j x_j over the K+1 source images into a small float buffer
// that stays in L1; stage 2 normalises the buffer and writes it out in the
// output layout and dtype.  Splitting the two stages lets each inner loop be a
// simple, vectorisable loop, and keeps the number of template instantiations at
// (input types × layouts) + (output types × layouts × channel cases) instead of
// their product.  Three-channel NHWC input headed for NCHW output (decoded
// images into a network) accumulates planar, de-interleaving the narrow input
// rather than the floats; at K = 1 one fused loop does both stages in registers.  The element arithmetic comes from mix_math.h, shared
// with the CUDA kernel.
#include "cpu/mix_images_cpu.h"

#ifndef MIXNN_CPU_ISA
#error "compile with -DMIXNN_CPU_ISA=<namespace>"
#endif

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "dispatch.h"

namespace mixnn {
namespace cpu {
namespace MIXNN_CPU_ISA {
namespace {

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

  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(pixels, kTileFloats / C));
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
      if (fused != nullptr) {
        fused(sources.data(), weights.data(), weight_sum, p.mean, p.inv_std, pixel0, n, pixels,
              out + row * out_row_bytes);
        continue;
      }
      accumulate(sources.data(), weights.data(), terms, pixel0, n, pixels, C, acc.data());
      store(acc.data(), weight_sum, p.mean, p.inv_std, pixel0, n, pixels, C, out + row * out_row_bytes);
    }
  }
}

}  // namespace MIXNN_CPU_ISA
}  // namespace cpu
}  // namespace mixnn
