// CUDA kernel of the fused mixer.  Thin on purpose: the per-thread work is
// cuda_body::mix_images_thread (cuda/mix_images_kernel.h), whose arithmetic is
// mix_math.h, shared with the CPU kernel; this file only launches it.
#include "cuda/mix_images_cuda.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/mix_images_kernel.h"
#include "dispatch.h"

namespace mixnn {
namespace cuda {
namespace {

template <typename Tin, typename Tout>
__global__ void mix_images_kernel(MixImagesParams p) {
  using cuda_body::Dim3;
  cuda_body::mix_images_thread<Tin, Tout>(p, Dim3{blockIdx.x, blockIdx.y, blockIdx.z},
                                          Dim3{blockDim.x, blockDim.y, blockDim.z},
                                          Dim3{threadIdx.x, threadIdx.y, threadIdx.z},
                                          Dim3{gridDim.x, gridDim.y, gridDim.z});
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("mix_images (CUDA): ") + what + ": " + cudaGetErrorString(status));
  }
}

}  // namespace

void mix_images(const MixImagesParams& p, std::intptr_t stream) {
  if (p.batch == 0 || pixels_per_image(p) == 0 || p.channels == 0) return;
  const cuda_body::LaunchConfig config = cuda_body::mix_images_launch_config(p);
  const dim3 grid(config.grid.x, config.grid.y, config.grid.z);
  const dim3 block(config.block.x, config.block.y, config.block.z);
  dispatch_in_out(p.in_dtype, p.out_dtype, [&](auto in_tag, auto out_tag) {
    using Tin = typename decltype(in_tag)::type;
    using Tout = typename decltype(out_tag)::type;
    mix_images_kernel<Tin, Tout><<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  });
  check(cudaGetLastError(), "kernel launch");
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace cuda
}  // namespace mixnn
