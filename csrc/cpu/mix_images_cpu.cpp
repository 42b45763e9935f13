// Chooses, once, which compiled CPU kernel mix_images runs.
#include "cpu/mix_images_cpu.h"

#include <atomic>
#include <stdexcept>

namespace mixnn {
namespace cpu {
namespace {

// The avx2 kernel is built with -mavx2 -mfma -mf16c (every AVX2 CPU has FMA and F16C, but ask).
bool cpu_has_avx2() {
#if defined(MIXNN_HAVE_AVX2_KERNEL) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The avx512 kernel also uses AVX-512 F, BW, VL and DQ; __builtin_cpu_supports checks that the
// OS saves the 512-bit state too.
bool cpu_has_avx512() {
#if defined(MIXNN_HAVE_AVX512_KERNEL) && (defined(__x86_64__) || defined(__i386__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"base", "avx2", "avx512"};

std::atomic<int> g_selected{-1};

int best_isa() { return cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kBase; }

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names{"base"};
  if (cpu_has_avx2()) names.emplace_back("avx2");
  if (cpu_has_avx512()) names.emplace_back("avx512");
  return names;
}

void select_isa(const std::string& name) {
  if (name == "auto") {
    g_selected = best_isa();
  } else if (name == "base") {
    g_selected = kBase;
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("isa: avx2 kernel not built or not supported by this CPU");
    g_selected = kAvx2;
  } else if (name == "avx512") {
    if (!cpu_has_avx512()) {
      throw std::invalid_argument("isa: avx512 kernel not built or not supported by this CPU");
    }
    g_selected = kAvx512;
  } else {
    throw std::invalid_argument("isa: expected 'auto', 'base', 'avx2' or 'avx512', got '" + name + "'");
  }
}

std::string selected_isa() {
  if (g_selected < 0) g_selected = best_isa();
  return kIsaNames[g_selected];
}

void mix_images(const MixImagesParams& p, int num_threads) {
  if (g_selected < 0) g_selected = best_isa();
#if defined(MIXNN_HAVE_AVX512_KERNEL)
  if (g_selected == kAvx512) return avx512::mix_images(p, num_threads);
#endif
#if defined(MIXNN_HAVE_AVX2_KERNEL)
  if (g_selected == kAvx2) return avx2::mix_images(p, num_threads);
#endif
  base::mix_images(p, num_threads);
}

}  // namespace cpu
}  // namespace mixnn
