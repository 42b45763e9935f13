// The CUDA implementation of mix_images (compiled only when nvcc is found).
#pragma once

#include <cstdint>

#include "mix_params.h"

namespace mixnn {
namespace cuda {

// Launches the kernel on `stream` (a cudaStream_t passed as an integer, e.g.
// torch.cuda.current_stream().cuda_stream) and checks the launch.  Pointers in
// `p` must be device pointers; the inputs must already be validated.
void mix_images(const MixImagesParams& p, std::intptr_t stream);

// Number of CUDA devices the runtime sees (0 without a driver or GPU).
int device_count();

}  // namespace cuda
}  // namespace mixnn
