// The CUDA kernel's body and launch geometry, compiled by nvcc for the GPU and by
// g++ for the host.
//
// The __global__ kernel (mix_images_cuda.cu) only forwards blockIdx, blockDim,
// threadIdx and gridDim to mix_images_thread(); the host emulator
// (cuda/grid_emulator.cpp) calls the same function for every block and
// thread of the same grid.  So the kernel's indexing — grid-stride loops, the
// offsets of both layouts, the 64-bit arithmetic, the bounds handling — runs in the
// tests on a machine without a GPU; only the launch itself is untested there.
//
// Bounds: the kernel reads an image only through an index it has checked against
// num_images.  A row with an index outside [0, num_images) is written as NaN (0 for
// uint8 outputs) and recorded in p.index_errors (mix_params.h says why the check is
// here and not in the binding).  The buffers' sizes are the binding's to check.
#pragma once

#include <cstdint>

#include "mix_params.h"

namespace mixnn {
namespace cuda_body {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

struct LaunchConfig {
  Dim3 grid;
  Dim3 block;
};

constexpr uint32_t kThreadsPerBlock = 256;
// Pixels are covered by a grid-stride loop, so a bounded grid suffices; rows use
// grid.y, whose hardware limit is 65535.
constexpr uint32_t kMaxBlocksX = 1024;
constexpr uint32_t kMaxBlocksY = 65535;

MIXNN_HD LaunchConfig mix_images_launch_config(const MixImagesParams& p) {
  const int64_t pixels = pixels_per_image(p);
  int64_t blocks_x = (pixels + kThreadsPerBlock - 1) / kThreadsPerBlock;
  blocks_x = blocks_x < 1 ? 1 : (blocks_x > kMaxBlocksX ? kMaxBlocksX : blocks_x);
  int64_t blocks_y = p.batch < 1 ? 1 : (p.batch > kMaxBlocksY ? kMaxBlocksY : p.batch);
  LaunchConfig config;
  config.grid.x = static_cast<uint32_t>(blocks_x);
  config.grid.y = static_cast<uint32_t>(blocks_y);
  config.block.x = kThreadsPerBlock;
  return config;
}

// Records one row with an out-of-range index.  Called by one thread per row (the one
// that owns pixel 0), so bad_rows counts rows, not threads.
MIXNN_HD void record_index_error(IndexErrors* errors, int64_t row, int64_t term) {
  if (errors == nullptr) return;
#if defined(__CUDA_ARCH__)
  atomicAdd(&errors->bad_rows, 1ull);
  atomicExch(&errors->where, encode_index_error(row, term));
#else  // the emulator runs the grid sequentially
  errors->bad_rows += 1;
  errors->where = encode_index_error(row, term);
#endif
}

// The first term of `row` whose index lies outside [0, num_images), or -1.  K+1 reads per
// row, against the row's K+1 reads per output element that follow.
MIXNN_HD int64_t first_bad_term(const MixImagesParams& p, int64_t row) {
  for (int64_t j = 0; j <= p.num_partners; ++j) {
    const int64_t index = term_index(p, row, j);
    if (index < 0 || index >= p.num_images) return j;
  }
  return -1;
}

// One thread's work: for each (row, pixel) it owns under the grid-stride loops,
// all C channels of the mixed output.  Consecutive threads take consecutive
// pixels, so NCHW writes are coalesced.
template <typename Tin, typename Tout>
MIXNN_HD void mix_images_thread(const MixImagesParams& p, Dim3 block_idx, Dim3 block_dim, Dim3 thread_idx,
                                Dim3 grid_dim) {
  const int64_t pixels = pixels_per_image(p);
  const int64_t C = p.channels;
  const int64_t image_elems = pixels * C;
  const int64_t terms = p.num_partners + 1;
  const Tin* images = static_cast<const Tin*>(p.images);
  Tout* out = static_cast<Tout*>(p.out);
  const int64_t pixel_start = static_cast<int64_t>(block_idx.x) * block_dim.x + thread_idx.x;
  const int64_t pixel_stride = static_cast<int64_t>(grid_dim.x) * block_dim.x;

  for (int64_t row = block_idx.y; row < p.batch; row += grid_dim.y) {
    const int64_t bad_term = first_bad_term(p, row);
    if (bad_term >= 0) {
      if (pixel_start == 0) record_index_error(p.index_errors, row, bad_term);
      const Tout poison = from_float<Tout>(bits_to_float(0x7FC00000u));  // quiet NaN; uint8: 0
      for (int64_t pixel = pixel_start; pixel < pixels; pixel += pixel_stride) {
        for (int64_t c = 0; c < C; ++c) {
          out[row * image_elems + element_offset(p.out_layout, pixel, c, pixels, C)] = poison;
        }
      }
      continue;
    }
    float weight_sum = 0.0f;
    for (int64_t j = 0; j < terms; ++j) weight_sum += term_weight(p, row, j);
    for (int64_t pixel = pixel_start; pixel < pixels; pixel += pixel_stride) {
      for (int64_t c = 0; c < C; ++c) {
        float acc = 0.0f;
        for (int64_t j = 0; j < terms; ++j) {
          // Checked above; clamped again because the kernel reads the index anew here, and a
          // caller racing on the index buffer must not turn that second read into an
          // out-of-bounds one.  Two integer operations beside a global load.
          int64_t index = term_index(p, row, j);
          index = index < 0 ? 0 : (index < p.num_images ? index : p.num_images - 1);
          const Tin* image = images + index * image_elems;
          acc = mix_accumulate(acc, term_weight(p, row, j),
                               to_float(image[element_offset(p.in_layout, pixel, c, pixels, C)]));
        }
        out[row * image_elems + element_offset(p.out_layout, pixel, c, pixels, C)] =
            from_float<Tout>(mix_normalise(acc, weight_sum, p.mean[c], p.inv_std[c]));
      }
    }
  }
}

}  // namespace cuda_body
}  // namespace mixnn
