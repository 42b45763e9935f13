// The OpenMP implementation of mix_images, and the choice of instruction set.
#pragma once

#include <string>
#include <vector>

#include "mix_params.h"

namespace mixnn {
namespace cpu {

// Writes p.out; the inputs must already be validated (indices in range, sizes
// consistent).  Parallel over (row, pixel tile) with `num_threads` OpenMP threads,
// using the kernel compiled for the selected instruction set.
void mix_images(const MixImagesParams& p, int num_threads);

// The instruction sets this build has kernels for and this CPU can run, best last ("base", "avx2", "avx512").
std::vector<std::string> available_isas();
// The kernel mix_images uses: "auto" (default: the best available), or a name from available_isas().
void select_isa(const std::string& name);
std::string selected_isa();

// One kernel per instruction set, each from mix_images_cpu_kernel.cpp.
namespace base {
void mix_images(const MixImagesParams& p, int num_threads);
}
#if defined(MIXNN_HAVE_AVX2_KERNEL)
namespace avx2 {
void mix_images(const MixImagesParams& p, int num_threads);
}
#endif
#if defined(MIXNN_HAVE_AVX512_KERNEL)
namespace avx512 {
void mix_images(const MixImagesParams& p, int num_threads);
}
#endif

}  // namespace cpu
}  // namespace mixnn
