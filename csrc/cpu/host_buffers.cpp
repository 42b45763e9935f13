// Pooled, huge-page-backed host buffers handed to torch as DLPack tensors (see host_buffers.h).
#include "cpu/host_buffers.h"

#include <pthread.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace mixnn {
namespace host {
namespace {

// The DLPack 0.x ABI (dlpack.h v0.8, unchanged since): the "dltensor" capsule that torch,
// NumPy, CuPy and JAX all accept.  Spelled out here because the extension links no libtorch.
struct DLDevice {
  int32_t device_type;  // kDLCPU = 1
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
constexpr int32_t kDLCPU = 1;

constexpr size_t kHugePage = size_t{2} << 20;  // x86-64 and arm64 (4 KiB granule) PMD size

size_t page_size() {
  static const size_t size = [] {
    const long value = sysconf(_SC_PAGESIZE);
    return value > 0 ? static_cast<size_t>(value) : size_t{4096};
  }();
  return size;
}

size_t round_up(size_t value, size_t multiple, const char* what) {
  if (value > SIZE_MAX - (multiple - 1)) throw std::invalid_argument(std::string(what) + ": size overflows");
  return (value + multiple - 1) / multiple * multiple;
}

struct Block {
  void* ptr = nullptr;
  size_t bytes = 0;  // the mapping's length: a whole number of pages (of 2 MiB for huge blocks)
};

// A fresh anonymous mapping of `bytes`.  Blocks of 2 MiB or more are aligned to 2 MiB (map
// 2 MiB more, unmap the ends) and advised MADV_HUGEPAGE, so that under THP's "madvise" mode
// (the common default) their first touch faults in huge pages.  The advice is only advice:
// with THP off, or no huge page free, the kernel falls back to 4 KiB pages.
Block map_block(size_t bytes, bool huge_pages) {
  const bool huge = huge_pages && bytes >= kHugePage;
  const size_t span = huge ? bytes + kHugePage : bytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  if (!huge) return {raw, bytes};
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
  const size_t head = aligned - begin;
  const size_t tail = span - head - bytes;
  if (head != 0) munmap(raw, head);
  if (tail != 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
#endif
  return {reinterpret_cast<void*>(aligned), bytes};
}

void unmap_block(const Block& block) { munmap(block.ptr, block.bytes); }

// The released blocks, most recent first, within a byte and a count limit.  The limits bound
// the memory held idle: a training loop needs one or two blocks per output size (the batch the
// model still holds and the one being made).
class Pool {
 public:
  Block acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == bytes) {
          const Block block = *it;
          free_.erase(it);
          cached_bytes_ -= block.bytes;
          ++hits_;
          note_live(block.bytes);
          return block;
        }
      }
      ++misses_;
    }
    const Block block = map_block(bytes, huge_pages());
    std::lock_guard<std::mutex> lock(mutex_);
    note_live(block.bytes);
    return block;
  }

  // Called from the DLPack deleter: on whichever thread drops the last reference.
  void release(const Block& block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --live_blocks_;
      live_bytes_ -= block.bytes;
      free_.push_front(block);
      cached_bytes_ += block.bytes;
      evict_locked(evicted);
    }
    for (const Block& b : evicted) unmap_block(b);  // outside the lock: unmapping faulted pages takes time
  }

  void configure(size_t max_bytes, size_t max_blocks, bool huge_pages) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      max_bytes_ = max_bytes;
      max_blocks_ = max_blocks;
      huge_pages_ = huge_pages;
      evict_locked(evicted);
    }
    for (const Block& b : evicted) unmap_block(b);
  }

  // Unmaps every cached block (live ones stay with their tensors).  Returns the bytes freed.
  size_t release_cached() {
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(free_);
      cached_bytes_ = 0;
    }
    size_t freed = 0;
    for (const Block& b : evicted) {
      freed += b.bytes;
      unmap_block(b);
    }
    return freed;
  }

  py::dict stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    d["cached_blocks"] = free_.size();
    d["cached_bytes"] = cached_bytes_;
    d["live_blocks"] = live_blocks_;
    d["live_bytes"] = live_bytes_;
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["max_cached_bytes"] = max_bytes_;
    d["max_cached_blocks"] = max_blocks_;
    d["huge_pages"] = huge_pages_;
    return d;
  }

  // fork(): the child gets a copy of the pool; a mutex held by another thread at the fork would
  // stay locked forever in the child, so fork waits for it (pthread_atfork, see bind()).
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  bool huge_pages() {
    std::lock_guard<std::mutex> lock(mutex_);
    return huge_pages_;
  }

  void note_live(size_t bytes) {
    ++live_blocks_;
    live_bytes_ += bytes;
  }

  void evict_locked(std::vector<Block>& evicted) {
    while (!free_.empty() && (cached_bytes_ > max_bytes_ || free_.size() > max_blocks_)) {
      evicted.push_back(free_.back());
      cached_bytes_ -= free_.back().bytes;
      free_.pop_back();
    }
  }

  std::mutex mutex_;
  std::deque<Block> free_;
  size_t cached_bytes_ = 0, live_bytes_ = 0, live_blocks_ = 0, hits_ = 0, misses_ = 0;
  size_t max_bytes_ = size_t{1} << 30;
  size_t max_blocks_ = 4;
  bool huge_pages_ = true;
};

// Never destroyed: torch may release a tensor (and call the deleter) during interpreter exit,
// after static destructors would have run.
Pool& pool() {
  static Pool* const instance = new Pool();
  return *instance;
}

struct Managed {
  DLManagedTensor dl{};
  std::vector<int64_t> shape, strides;
  Block block;
};

void managed_deleter(DLManagedTensor* self) {
  auto* managed = static_cast<Managed*>(self->manager_ctx);
  pool().release(managed->block);
  delete managed;
}

// A capsule nobody consumed (torch renames the ones it takes to "used_dltensor" and owns them).
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* dl = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    dl->deleter(dl);
  }
}

py::object host_empty(const std::vector<int64_t>& shape, int dl_code, int dl_bits) {
  if (!(dl_code == 0 || dl_code == 1 || dl_code == 2 || dl_code == 4) ||
      !(dl_bits == 8 || dl_bits == 16 || dl_bits == 32 || dl_bits == 64)) {
    throw std::invalid_argument("host_empty: unsupported DLPack dtype (code " + std::to_string(dl_code) + ", " +
                                std::to_string(dl_bits) + " bits)");
  }
  if (shape.size() > 64) throw std::invalid_argument("host_empty: at most 64 dimensions");
  int64_t bytes = dl_bits / 8;
  for (const int64_t dim : shape) {
    if (dim < 0) throw std::invalid_argument("host_empty: negative dimension " + std::to_string(dim));
    if (__builtin_mul_overflow(bytes, dim, &bytes)) throw std::invalid_argument("host_empty: size overflows int64");
  }
  // At least one page, so that every tensor owns a mapping of its own; huge blocks are whole
  // 2 MiB pages, so that blocks of one shape are interchangeable in the pool.
  size_t length = round_up(std::max<size_t>(static_cast<size_t>(bytes), 1), page_size(), "host_empty");
  if (length >= kHugePage) length = round_up(length, kHugePage, "host_empty");

  auto managed = std::make_unique<Managed>();
  managed->shape = shape;
  managed->strides.assign(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) managed->strides[d - 1] = managed->strides[d] * std::max<int64_t>(shape[d], 1);
  managed->block = pool().acquire(length);
  DLTensor& t = managed->dl.dl_tensor;
  t.data = managed->block.ptr;
  t.device = {kDLCPU, 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = {static_cast<uint8_t>(dl_code), static_cast<uint8_t>(dl_bits), 1};
  t.shape = managed->shape.data();
  t.strides = managed->strides.data();
  t.byte_offset = 0;
  managed->dl.manager_ctx = managed.get();
  managed->dl.deleter = managed_deleter;
  Managed* raw = managed.release();
  PyObject* capsule = PyCapsule_New(&raw->dl, "dltensor", capsule_destructor);
  if (capsule == nullptr) {
    managed_deleter(&raw->dl);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

}  // namespace

void bind(py::module_& m) {
  static const bool fork_handlers = [] {
    pthread_atfork([] { pool().lock_for_fork(); }, [] { pool().unlock_after_fork(); },
                   [] { pool().unlock_after_fork(); });
    return true;
  }();
  (void)fork_handlers;

  m.def("host_empty", &host_empty, py::arg("shape"), py::arg("dl_code"), py::arg("dl_bits"),
        "An uninitialised C-contiguous host buffer of `shape` and DLPack dtype (code, bits), as a\n"
        "'dltensor' capsule for torch.from_dlpack: from the pool when a released buffer of the same\n"
        "size is cached (pages already mapped), else a fresh 2 MiB-aligned mapping advised\n"
        "MADV_HUGEPAGE.  Returned to the pool when torch releases the tensor's storage.");
  m.def(
      "host_pool_configure",
      [](int64_t max_cached_bytes, int64_t max_cached_blocks, bool huge_pages) {
        if (max_cached_bytes < 0 || max_cached_blocks < 0) {
          throw std::invalid_argument("host_pool_configure: limits must be >= 0");
        }
        pool().configure(static_cast<size_t>(max_cached_bytes), static_cast<size_t>(max_cached_blocks), huge_pages);
      },
      py::arg("max_cached_bytes"), py::arg("max_cached_blocks"), py::arg("huge_pages"),
      "Limits of the idle buffers kept for reuse (0: none), and whether new mappings ask for huge pages.");
  m.def("host_pool_stats", []() { return pool().stats(); },
        "{cached_blocks, cached_bytes, live_blocks, live_bytes, hits, misses, max_cached_bytes, "
        "max_cached_blocks, huge_pages}");
  m.def("host_pool_release", []() { return pool().release_cached(); },
        "Unmap every idle buffer of the pool; returns the bytes released.");
}

}  // namespace host
}  // namespace mixnn
