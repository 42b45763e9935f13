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

MIXNN_HD float term_weight(const MixImagesParams& p, int64_t row, int64_t term) {
  return p.weights[row * (p.num_partners + 1) + term];
}

MIXNN_ISA_FUNCTIONS_END
}  // namespace mixnn
