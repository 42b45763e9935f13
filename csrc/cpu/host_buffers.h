// Host output buffers for mix_images' default call (no out=): large, 2 MiB-aligned anonymous
// mappings with transparent huge pages requested, handed to torch through DLPack and kept in a
// small pool once torch releases them.
//
// Why: a fresh 154 MB float32 output (B = 256, 224x224x3) page-faults on first touch, and the
// faults cost several times the mixing itself.  Two remedies, both here:
//   - huge pages (madvise(MADV_HUGEPAGE) on a 2 MiB-aligned mapping): a first touch faults in
//     2 MiB at a time instead of 4 KiB, when the kernel has huge pages to give;
//   - reuse: a buffer whose tensor torch has released goes back to a pool, and the next call of
//     the same size gets it with its pages already mapped.
//
// The reuse rule is torch's own allocator contract.  torch calls a DLPack tensor's deleter when
// its storage is destroyed, i.e. when no tensor, view, storage object, NumPy array or DLPack
// capsule refers to it any more; only then does the buffer re-enter the pool.  That is the same
// moment at which torch's default CPU allocator would hand the memory back to malloc for reuse.
// The deleter may run on any thread, with or without the GIL: the pool is guarded by its own
// mutex and never calls into Python.
#pragma once

#include <pybind11/pybind11.h>

namespace mixnn {
namespace host {

// Registers on `m`: host_empty, host_pool_configure, host_pool_stats, host_pool_release.
void bind(pybind11::module_& m);

}  // namespace host
}  // namespace mixnn
