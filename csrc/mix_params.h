// The description of one mix_images call: raw pointers, sizes and layouts.
//
// The extension does not link against libtorch: Python validates the tensors,
// makes them contiguous, and hands over data pointers and sizes.  Everything the
// kernels need is in this one plain struct, which is passed by value to the CUDA
// kernel as well.
#pragma once

#include <cstdint>

#include "mix_math.h"

namespace mixnn {

// Where the CUDA kernel (and its host emulation) reports anchor or partner indices outside
// [0, num_images).  The CPU binding checks every index before its kernel runs; the CUDA binding
// cannot without copying the indices to the host and waiting for the device, once per batch.  So
// the CUDA kernel checks each row's indices itself: a row with a bad index is never read, its
// output is written as NaN (0 for uint8 outputs), and the row is recorded here.
struct IndexErrors {
  unsigned long long bad_rows = 0;  // output rows that had an index outside [0, num_images)
  unsigned long long where = 0;     // 0, or encode_index_error(row, term) of one of those rows
};

// One word for (row, term), so a single atomic store keeps the pair consistent: the row in the
// high 40 bits, the term (0 = anchor, j = partner j - 1) in the low 24, saturated; plus one, so
// that 0 means "none".
constexpr int kIndexErrorTermBits = 24;
constexpr unsigned long long kIndexErrorTermMask = (1ull << kIndexErrorTermBits) - 1;

struct MixImagesParams {
  const void* images = nullptr;  // (M, H, W, C) or (M, C, H, W), contiguous, in_dtype
  DType in_dtype = DType::kUInt8;
  Layout in_layout = Layout::kNHWC;
  int64_t num_images = 0;  // M
  int64_t height = 0;      // H
  int64_t width = 0;       // W
  int64_t channels = 0;    // C

  const int64_t* anchors = nullptr;   // (B,)   indices into images, validated in [0, M)
  const int64_t* partners = nullptr;  // (B, K) indices into images, validated in [0, M)
  const float* weights = nullptr;     // (B, K+1): column 0 = anchor's λ, then the partners' β
  int64_t batch = 0;                  // B
  int64_t num_partners = 0;           // K

  const float* mean = nullptr;     // (C,)
  const float* inv_std = nullptr;  // (C,) 1/std

  void* out = nullptr;  // (B, C, H, W) or (B, H, W, C), contiguous, out_dtype
  DType out_dtype = DType::kFloat32;
  Layout out_layout = Layout::kNCHW;

  // Set by the bindings, never from Python: where the CUDA kernel records out-of-range indices
  // (device memory for the GPU, host memory for the emulator).  Null: nothing is recorded, and
  // bad rows are still not read.  The CPU kernel does not use it.
  IndexErrors* index_errors = nullptr;
};

MIXNN_ISA_FUNCTIONS_BEGIN  // one copy per CPU instruction set (see mix_math.h)

MIXNN_HD int64_t pixels_per_image(const MixImagesParams& p) { return p.height * p.width; }

// Offset of element (pixel, channel) inside one image of the given layout.
MIXNN_HD int64_t element_offset(Layout layout, int64_t pixel, int64_t channel, int64_t pixels,
                                int64_t channels) {
  return layout == Layout::kNHWC ? pixel * channels + channel : channel * pixels + pixel;
}

// The image index mixed as term j (0 = anchor, 1..K = partners) of output row b.
MIXNN_HD int64_t term_index(const MixImagesParams& p, int64_t row, int64_t term) {
  return term == 0 ? p.anchors[row] : p.partners[row * p.num_partners + (term - 1)];
}

MIXNN_HD unsigned long long encode_index_error(int64_t row, int64_t term) {
  const unsigned long long t =
      static_cast<unsigned long long>(term) < kIndexErrorTermMask ? static_cast<unsigned long long>(term)
                                                                  : kIndexErrorTermMask;
  return ((static_cast<unsigned long long>(row) << kIndexErrorTermBits) | t) + 1;
}

MIXNN_HD float term_weight(const MixImagesParams& p, int64_t row, int64_t term) {
  return p.weights[row * (p.num_partners + 1) + term];
}

MIXNN_ISA_FUNCTIONS_END
}  // namespace mixnn
