// The CUDA implementation of mix_images (compiled only when nvcc is found).
#pragma once

#include <cstdint>

#include "mix_params.h"

namespace mixnn {
namespace cuda {

// Launches the kernel on `stream` (a cudaStream_t passed as an integer, e.g.
// torch.cuda.current_stream().cuda_stream) on the current device, and checks the launch.
// Pointers in `p` must be device pointers and the buffers' sizes checked; the indices need
// not be: the kernel checks them itself (cuda/mix_images_kernel.h) and records bad rows in
// the current device's IndexErrors record (p.index_errors is replaced by it).  Nothing here
// waits for the device: the record is copied back to pinned host memory behind the kernel,
// and poll_index_errors reads that copy once it has landed.
void mix_images(const MixImagesParams& p, std::intptr_t stream);

// Out-of-range indices the kernel met and no earlier poll or take reported.
struct IndexErrorReport {
  unsigned long long bad_rows = 0;  // rows written as NaN (0 for uint8) instead of read
  unsigned long long where = 0;     // encode_index_error(row, term) of one of them (mix_params.h)
};

// What the last completed copy of `device`'s record shows (launches still running, or whose
// copy has not landed, are reported by a later poll).  Never waits for the device.
IndexErrorReport poll_index_errors(int device);

// Waits for everything queued on `device`, then reports every launch made so far.
IndexErrorReport take_index_errors(int device);

// Number of CUDA devices the runtime sees (0 without a driver or GPU).
int device_count();

}  // namespace cuda
}  // namespace mixnn
