// CUDA kernel of the fused mixer.  Thin on purpose: the per-thread work is
// cuda_body::mix_images_thread (cuda/mix_images_kernel.h), whose arithmetic is
// mix_math.h, shared with the CPU kernel; this file launches it and keeps, per
// device, the record where the kernel reports out-of-range indices.
#include "cuda/mix_images_cuda.h"

#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

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
    cudaGetLastError();  // clear a non-sticky error, so that the next CUDA call does not report it again
    throw std::runtime_error(std::string("mix_images (CUDA): ") + what + ": " + cudaGetErrorString(status));
  }
}

// One device's IndexErrors record and its way back to the host.  The kernel only adds to the
// record, so the host never resets it: `reported_rows` says how much of it was reported.
// Never freed: the CUDA runtime may already be shut down when static destructors run.
struct ErrorSlot {
  std::mutex mutex;
  IndexErrors* on_device = nullptr;  // the kernel's atomics (device memory)
  IndexErrors* landed = nullptr;     // pinned host copy, written by the copy behind a launch
  cudaEvent_t copied = nullptr;      // recorded after that copy
  bool copy_pending = false;         // a copy is queued and the host has not seen it land
  unsigned long long reported_rows = 0;
};

// The current device's slot, made on first use (allocations and a one-time wait, so that the
// zeroed record is visible to every stream).
ErrorSlot& slot_for(int device) {
  static std::mutex slots_mutex;
  static std::vector<ErrorSlot*> slots;
  std::lock_guard<std::mutex> lock(slots_mutex);
  if (device < 0) throw std::invalid_argument("mix_images (CUDA): device must be >= 0");
  if (static_cast<size_t>(device) >= slots.size()) slots.resize(device + 1, nullptr);
  if (slots[device] == nullptr) {
    auto slot = std::make_unique<ErrorSlot>();
    check(cudaMalloc(&slot->on_device, sizeof(IndexErrors)), "cannot allocate the index error record");
    check(cudaMemset(slot->on_device, 0, sizeof(IndexErrors)), "cannot clear the index error record");
    check(cudaHostAlloc(&slot->landed, sizeof(IndexErrors), cudaHostAllocDefault),
          "cannot allocate the index error record's host copy");
    *slot->landed = IndexErrors{};
    check(cudaEventCreateWithFlags(&slot->copied, cudaEventDisableTiming), "cannot create an event");
    check(cudaDeviceSynchronize(), "cannot clear the index error record");
    slots[device] = slot.release();
  }
  return *slots[device];
}

// The part of `total` rows not reported yet (called with the slot's mutex held).
IndexErrorReport unreported(ErrorSlot& slot, const IndexErrors& seen) {
  IndexErrorReport report;
  if (seen.bad_rows > slot.reported_rows) {
    report.bad_rows = seen.bad_rows - slot.reported_rows;
    report.where = seen.where;
    slot.reported_rows = seen.bad_rows;
  }
  return report;
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "no current CUDA device");
    if (device != previous_) check(cudaSetDevice(device), "cannot select the device");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

void mix_images(const MixImagesParams& params, std::intptr_t stream_handle) {
  if (params.batch == 0 || pixels_per_image(params) == 0 || params.channels == 0) return;
  int device = 0;
  check(cudaGetDevice(&device), "no current CUDA device");
  ErrorSlot& slot = slot_for(device);
  MixImagesParams p = params;
  p.index_errors = slot.on_device;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const cuda_body::LaunchConfig config = cuda_body::mix_images_launch_config(p);
  const dim3 grid(config.grid.x, config.grid.y, config.grid.z);
  const dim3 block(config.block.x, config.block.y, config.block.z);
  dispatch_in_out(p.in_dtype, p.out_dtype, [&](auto in_tag, auto out_tag) {
    using Tin = typename decltype(in_tag)::type;
    using Tout = typename decltype(out_tag)::type;
    mix_images_kernel<Tin, Tout><<<grid, block, 0, stream>>>(p);
  });
  check(cudaGetLastError(), "kernel launch");
  // At most one copy in flight: 16 bytes behind this kernel on its stream, read by a later
  // poll once the event says it landed.
  std::lock_guard<std::mutex> lock(slot.mutex);
  if (!slot.copy_pending) {
    check(cudaMemcpyAsync(slot.landed, slot.on_device, sizeof(IndexErrors), cudaMemcpyDeviceToHost, stream),
          "cannot queue the index error record's copy");
    check(cudaEventRecord(slot.copied, stream), "cannot record an event");
    slot.copy_pending = true;
  }
}

IndexErrorReport poll_index_errors(int device) {
  ErrorSlot& slot = slot_for(device);
  std::lock_guard<std::mutex> lock(slot.mutex);
  if (!slot.copy_pending) return {};
  const cudaError_t status = cudaEventQuery(slot.copied);
  if (status == cudaErrorNotReady) {
    cudaGetLastError();  // "not ready" is no error, but the runtime records it as the last one
    return {};
  }
  check(status, "cannot query the index error record's copy");
  slot.copy_pending = false;
  return unreported(slot, *slot.landed);
}

IndexErrorReport take_index_errors(int device) {
  DeviceGuard guard(device);
  ErrorSlot& slot = slot_for(device);
  check(cudaDeviceSynchronize(), "cannot wait for the device");
  IndexErrors seen;
  check(cudaMemcpy(&seen, slot.on_device, sizeof(IndexErrors), cudaMemcpyDeviceToHost),
        "cannot read the index error record");
  std::lock_guard<std::mutex> lock(slot.mutex);
  slot.copy_pending = false;  // the device is idle: the queued copy has landed, and is older than `seen`
  return unreported(slot, seen);
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
