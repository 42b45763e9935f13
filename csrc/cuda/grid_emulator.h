// Runs the CUDA kernel's body on the host, over the grid the launcher would use.
#pragma once

#include <cstdint>

#include "mix_params.h"

namespace mixnn {
namespace emulator {

// Calls cuda_body::mix_images_thread for every block and thread of the launch
// configuration, sequentially.  grid_x / grid_y > 0 override the grid so the
// tests can force the grid-stride loops to wrap.  Host pointers only.
void mix_images(const MixImagesParams& p, int64_t grid_x, int64_t grid_y);

}  // namespace emulator
}  // namespace mixnn
