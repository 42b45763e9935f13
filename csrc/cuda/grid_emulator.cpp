// Host emulation of the CUDA grid: the kernel body in cuda/mix_images_kernel.h
// is compiled here by g++ and executed block by block, thread by thread, so its
// indexing is tested without a GPU.  It sits beside that body, not with the CPU
// kernel, because it runs the CUDA path's code; it is built with or without nvcc.
#include "cuda/grid_emulator.h"

#include <stdexcept>

#include "cuda/mix_images_kernel.h"
#include "dispatch.h"

namespace mixnn {
namespace emulator {

void mix_images(const MixImagesParams& p, int64_t grid_x, int64_t grid_y) {
  if (p.batch == 0 || pixels_per_image(p) == 0 || p.channels == 0) return;
  cuda_body::LaunchConfig config = cuda_body::mix_images_launch_config(p);
  if (grid_x < 0 || grid_y < 0) throw std::invalid_argument("grid sizes must be >= 0 (0 = the launcher's)");
  if (grid_x > 0) config.grid.x = static_cast<uint32_t>(grid_x);
  if (grid_y > 0) config.grid.y = static_cast<uint32_t>(grid_y);
  dispatch_in_out(p.in_dtype, p.out_dtype, [&](auto in_tag, auto out_tag) {
    using Tin = typename decltype(in_tag)::type;
    using Tout = typename decltype(out_tag)::type;
    using cuda_body::Dim3;
    for (uint32_t by = 0; by < config.grid.y; ++by)
      for (uint32_t bx = 0; bx < config.grid.x; ++bx)
        for (uint32_t tx = 0; tx < config.block.x; ++tx)
          cuda_body::mix_images_thread<Tin, Tout>(p, Dim3{bx, by, 0}, config.block, Dim3{tx, 0, 0}, config.grid);
  });
}

}  // namespace emulator
}  // namespace mixnn
