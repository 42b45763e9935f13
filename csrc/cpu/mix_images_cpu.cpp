// Chooses, once, which compiled CPU kernel mix_images runs.
#include "cpu/mix_images_cpu.h"

#include <atomic>
#include <stdexcept>

namespace mixnn {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(MIXNN_HAVE_AVX2_KERNEL) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// 0 = base, 1 = avx2
std::atomic<int> g_selected{-1};

int best_isa() { return cpu_has_avx2() ? 1 : 0; }

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names{"base"};
  if (cpu_has_avx2()) names.emplace_back("avx2");
  return names;
}

void select_isa(const std::string& name) {
  if (name == "auto") {
    g_selected = best_isa();
  } else if (name == "base") {
    g_selected = 0;
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("isa: avx2 kernel not built or not supported by this CPU");
    g_selected = 1;
  } else {
    throw std::invalid_argument("isa: expected 'auto', 'base' or 'avx2', got '" + name + "'");
  }
}

std::string selected_isa() {
  if (g_selected < 0) g_selected = best_isa();
  return g_selected == 1 ? "avx2" : "base";
}

void mix_images(const MixImagesParams& p, int num_threads) {
  if (g_selected < 0) g_selected = best_isa();
#if defined(MIXNN_HAVE_AVX2_KERNEL)
  if (g_selected == 1) return avx2::mix_images(p, num_threads);
#endif
  base::mix_images(p, num_threads);
}

}  // namespace cpu
}  // namespace mixnn
