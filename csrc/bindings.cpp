// All Python bindings of mixnn_fast._C.
//
// Tensors do not cross this boundary as objects: the Python front
// (mixnn_fast/mix/mixer.py) validates them, makes them contiguous and fills a
// MixImagesParams with their data pointers and sizes.  So the extension needs
// neither libtorch nor a particular torch version.  The GIL is released while
// the kernels run.
//
// The bindings do not trust the front, though: anything in Python can build a
// MixImagesParams and call them.  Each binding first checks its inputs
// (torchvision's order: check, return early when there is no work, then run):
//
//   - sizes are >= 0 and their products fit in int64;
//   - every buffer whose size is known is large enough for the sizes
//     (ValueError naming it).  A pointer set from a Python buffer (a NumPy
//     array, memoryview, ...) knows its size and must be C-contiguous; a raw
//     address does not, and the caller declares it in `<name>_nbytes` (-1, the
//     default, means undeclared: nothing can be checked for that buffer);
//   - out does not overlap any input (a kernel writing into its own index
//     arrays would read indices it wrote);
//   - on the CPU, every anchor and partner index lies in [0, num_images)
//     (IndexError naming the argument and the position): O(B·K) reads, against
//     the kernel's O(B·K·H·W·C).
//
// On CUDA the indices are in device memory, and reading them here would copy them
// to the host and wait for the device once per batch.  So the CUDA binding checks
// sizes and pointers only, and the kernel checks the indices itself: a row with an
// index outside [0, num_images) is written as NaN (0 for uint8) instead of being
// read, and counted in a per-device record (cuda/mix_images_kernel.h).  The record
// comes back to the host behind the kernels, without waiting; the first call that
// finds new bad rows in it raises IndexError, and cuda_take_index_errors reports
// them after waiting for the device.  The emulated grid runs the same kernel body
// and returns its record.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/host_buffers.h"
#include "cpu/mix_images_cpu.h"
#include "cuda/grid_emulator.h"
#include "cuda/mix_images_kernel.h"
#include "dispatch.h"
#include "mix_params.h"
#ifdef MIXNN_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/mix_images_cuda.h"
#endif

namespace py = pybind11;
using mixnn::DType;
using mixnn::Layout;
using mixnn::MixImagesParams;

namespace {

constexpr int64_t kUndeclared = -1;

// What Python sees as MixImagesParams: the kernels' plain struct, plus the size in bytes of
// each buffer where it is known, and the Python buffers it was taken from (kept alive as long
// as the params hold their pointers).  The kernels receive the MixImagesParams part only.
struct BoundParams : MixImagesParams {
  int64_t images_nbytes = kUndeclared;
  int64_t anchors_nbytes = kUndeclared;
  int64_t partners_nbytes = kUndeclared;
  int64_t weights_nbytes = kUndeclared;
  int64_t mean_nbytes = kUndeclared;
  int64_t inv_std_nbytes = kUndeclared;
  int64_t out_nbytes = kUndeclared;
  py::object images_owner, anchors_owner, partners_owner, weights_owner, mean_owner, inv_std_owner, out_owner;
};

[[noreturn]] void fail(const std::string& where, const std::string& message) {
  throw std::invalid_argument(where + ": " + message);
}

int64_t dtype_bytes(DType dtype) {
  return mixnn::dispatch_dtype(dtype, "dtype", [](auto tag) -> int64_t { return sizeof(typename decltype(tag)::type); });
}

int64_t product(const char* where, std::initializer_list<int64_t> factors, const char* what) {
  int64_t result = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(result, f, &result)) fail(where, std::string(what) + " overflows int64");
  }
  return result;
}

// One buffer of a call: its name, where it starts, how many bytes the call touches, and how
// many the caller says it holds (kUndeclared if unknown).
struct Span {
  const char* name;
  const void* ptr;
  int64_t needed;
  int64_t declared;
};

// The byte sizes every buffer must have for these sizes and dtypes, and the size checks that
// need no memory access.  Shared by all bindings, in the order the error messages should come.
std::vector<Span> checked_spans(const BoundParams& p, const char* where) {
  auto nonnegative = [&](int64_t value, const char* name) {
    if (value < 0) fail(where, std::string(name) + " must be >= 0, got " + std::to_string(value));
  };
  nonnegative(p.num_images, "num_images");
  nonnegative(p.height, "height");
  nonnegative(p.width, "width");
  nonnegative(p.channels, "channels");
  nonnegative(p.batch, "batch");
  nonnegative(p.num_partners, "num_partners");
  const int64_t image_elems = product(where, {p.height, p.width, p.channels}, "height * width * channels");
  if (p.num_partners == INT64_MAX) fail(where, "num_partners + 1 overflows int64");
  const int64_t terms = p.num_partners + 1;
  std::vector<Span> spans = {
      {"images", p.images, product(where, {p.num_images, image_elems, dtype_bytes(p.in_dtype)}, "images size"),
       p.images_nbytes},
      {"anchors", p.anchors, product(where, {p.batch, 8}, "anchors size"), p.anchors_nbytes},
      {"partners", p.partners, product(where, {p.batch, p.num_partners, 8}, "partners size"), p.partners_nbytes},
      {"weights", p.weights, product(where, {p.batch, terms, 4}, "weights size"), p.weights_nbytes},
      {"mean", p.mean, product(where, {p.channels, 4}, "mean size"), p.mean_nbytes},
      {"inv_std", p.inv_std, product(where, {p.channels, 4}, "inv_std size"), p.inv_std_nbytes},
      {"out", p.out, product(where, {p.batch, image_elems, dtype_bytes(p.out_dtype)}, "out size"), p.out_nbytes},
  };
  static const char* const kShapes[] = {
      "num_images * height * width * channels elements of in_dtype", "batch int64 indices",
      "batch * num_partners int64 indices", "batch * (num_partners + 1) float32 weights",
      "channels float32 values", "channels float32 values", "batch * height * width * channels elements of out_dtype"};
  for (size_t i = 0; i < spans.size(); ++i) {
    const Span& s = spans[i];
    if (s.declared < kUndeclared) fail(where, std::string(s.name) + "_nbytes must be >= 0 (or -1: undeclared)");
    if (s.declared != kUndeclared && s.declared < s.needed) {
      fail(where, std::string(s.name) + ": buffer holds " + std::to_string(s.declared) + " bytes, the call needs " +
                      std::to_string(s.needed) + " (" + kShapes[i] + ")");
    }
  }
  return spans;
}

// Null pointers and overlaps with out, for a call that has work to do.
void check_pointers(const std::vector<Span>& spans, const char* where) {
  for (const Span& s : spans) {
    if (s.needed > 0 && s.ptr == nullptr) fail(where, std::string(s.name) + ": pointer is null");
  }
  const Span& out = spans.back();
  const auto out_begin = reinterpret_cast<std::uintptr_t>(out.ptr);
  std::uintptr_t out_end;
  if (__builtin_add_overflow(out_begin, static_cast<std::uintptr_t>(out.needed), &out_end)) {
    fail(where, "out: address range wraps around");
  }
  for (size_t i = 0; i + 1 < spans.size(); ++i) {
    const Span& s = spans[i];
    if (s.needed == 0) continue;
    const auto begin = reinterpret_cast<std::uintptr_t>(s.ptr);
    std::uintptr_t end;
    if (__builtin_add_overflow(begin, static_cast<std::uintptr_t>(s.needed), &end)) {
      fail(where, std::string(s.name) + ": address range wraps around");
    }
    if (begin < out_end && out_begin < end) {
      fail(where, std::string("out: overlaps ") + s.name + " in memory; the mixer cannot write in place");
    }
  }
}

// IndexError (std::out_of_range) naming the first index outside [0, num_images).
void check_indices(const int64_t* values, int64_t count, int64_t columns, int64_t num_images, const char* name,
                   const char* where) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t v = values[i];
    if (v < 0 || v >= num_images) {
      const std::string at = columns > 0 ? "[" + std::to_string(i / columns) + ", " + std::to_string(i % columns) + "]"
                                         : "[" + std::to_string(i) + "]";
      throw std::out_of_range(std::string(where) + ": " + name + at + " = " + std::to_string(v) +
                              " is out of range [0, " + std::to_string(num_images) + ") (num_images)");
    }
  }
}

bool has_work(const MixImagesParams& p) { return p.batch > 0 && p.height * p.width * p.channels > 0; }

// Sizes and pointers, for host pointers.  Returns false when there is no work (nothing is read
// or written then, so the pointers are not looked at).
bool check_host_buffers(const BoundParams& p, const char* where) {
  const std::vector<Span> spans = checked_spans(p, where);
  if (!has_work(p)) return false;
  check_pointers(spans, where);
  return true;
}

// Everything above, for the CPU kernel: sizes, pointers and every index.
bool check_host_call(const BoundParams& p, const char* where) {
  if (!check_host_buffers(p, where)) return false;
  check_indices(p.anchors, p.batch, 0, p.num_images, "anchors", where);
  check_indices(p.partners, p.batch * p.num_partners, p.num_partners, p.num_images, "partners", where);
  return true;
}

py::tuple index_error_tuple(unsigned long long bad_rows, unsigned long long where) {
  if (bad_rows == 0) return py::make_tuple(0, py::none(), py::none());
  const unsigned long long code = where - 1;
  return py::make_tuple(bad_rows, where == 0 ? py::object(py::none()) : py::int_(code >> mixnn::kIndexErrorTermBits),
                        where == 0 ? py::object(py::none()) : py::int_(code & mixnn::kIndexErrorTermMask));
}

#ifdef MIXNN_WITH_CUDA
void check_cuda(cudaError_t status, const char* where, const std::string& what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it, so that the next CUDA call does not report it again
    fail(where, what + " (" + cudaGetErrorString(status) + ")");
  }
}

// Device (or managed, or mapped pinned) memory on the current device: what the kernel can read.
void check_device_pointer(const Span& s, int device, const char* where) {
  if (s.needed == 0) return;
  cudaPointerAttributes attributes{};
  check_cuda(cudaPointerGetAttributes(&attributes, s.ptr), where, std::string(s.name) + ": cannot query the pointer");
  const bool on_device = attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged ||
                         (attributes.type == cudaMemoryTypeHost && attributes.devicePointer != nullptr);
  if (!on_device) {
    fail(where, std::string(s.name) + ": is not memory the GPU can read (host memory? mix_images_cuda needs device "
                                      "pointers)");
  }
  if (attributes.type == cudaMemoryTypeDevice && attributes.device != device) {
    fail(where, std::string(s.name) + ": is on device " + std::to_string(attributes.device) +
                    " but the kernel runs on device " + std::to_string(device));
  }
}

// "row r, term j (partners[r, j-1])" for a record's `where` (mix_params.h's encoding).
std::string index_error_position(unsigned long long where) {
  if (where == 0) return "position unknown";
  const unsigned long long code = where - 1;
  const unsigned long long row = code >> mixnn::kIndexErrorTermBits;
  const unsigned long long term = code & mixnn::kIndexErrorTermMask;
  const std::string r = std::to_string(row);
  if (term == 0) return "row " + r + ": anchors[" + r + "]";
  if (term == mixnn::kIndexErrorTermMask) return "row " + r + ": a partner past column " + std::to_string(term - 1);
  return "row " + r + ": partners[" + r + ", " + std::to_string(term - 1) + "]";
}

bool check_cuda_call(const BoundParams& p, const char* where) {
  const std::vector<Span> spans = checked_spans(p, where);
  if (!has_work(p)) return false;
  check_pointers(spans, where);
  int device = 0;
  check_cuda(cudaGetDevice(&device), where, "no current CUDA device");
  for (const Span& s : spans) check_device_pointer(s, device, where);
  // Bad rows of earlier calls whose record has come back (never waits for the device).
  const mixnn::cuda::IndexErrorReport earlier = mixnn::cuda::poll_index_errors(device);
  if (earlier.bad_rows > 0) {
    throw std::out_of_range(std::string(where) + ": an earlier call on CUDA device " + std::to_string(device) +
                            " met an index outside [0, num_images) in " + std::to_string(earlier.bad_rows) +
                            " output row(s), written as NaN (0 for uint8) instead of read (one of them: " +
                            index_error_position(earlier.where) + "); this call was not run");
  }
  return true;
}
#endif

// A pointer property: an int (an address; its size, if known, goes in <name>_nbytes) or a
// C-contiguous Python buffer (pointer and size taken from it; the buffer is kept alive).
// `element` checks the buffer's item type for typed fields (nullptr: any type).
template <typename T>
void def_pointer(py::class_<BoundParams>& cls, const char* name, T MixImagesParams::*field,
                 int64_t BoundParams::*nbytes, py::object BoundParams::*owner, bool writable,
                 bool (*element)(const py::buffer_info&), const char* element_name) {
  cls.def_property(
      name, [field](const BoundParams& p) { return reinterpret_cast<std::uintptr_t>(p.*field); },
      [=](BoundParams& p, const py::object& value) {
        const std::string where = std::string("MixImagesParams.") + name;
        if (PyLong_Check(value.ptr()) && !PyBool_Check(value.ptr())) {
          const unsigned long long address = PyLong_AsUnsignedLongLong(value.ptr());
          if (address == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
            PyErr_Clear();
            fail(where, "an address must be an int in [0, 2**64), got " + py::repr(value).cast<std::string>());
          }
          p.*field = reinterpret_cast<T>(static_cast<std::uintptr_t>(address));
          p.*owner = py::object();
          return;
        }
        if (!PyObject_CheckBuffer(value.ptr())) {
          throw py::type_error(where + ": expected an address (int) or a C-contiguous buffer such as a NumPy "
                                       "array, got " + std::string(Py_TYPE(value.ptr())->tp_name));
        }
        py::buffer_info info;
        try {
          info = py::reinterpret_borrow<py::buffer>(value).request(writable);
        } catch (py::error_already_set& err) {
          fail(where, std::string(writable ? "needs a writable buffer: " : "cannot read the buffer: ") + err.what());
        }
        if (element != nullptr && !element(info)) {
          fail(where, std::string("expected ") + element_name + " elements, got buffer format '" + info.format +
                          "' (" + std::to_string(info.itemsize) + " bytes each)");
        }
        py::ssize_t expected = info.itemsize;
        for (py::ssize_t d = info.ndim - 1; d >= 0 && info.size > 0; --d) {
          if (info.shape[d] != 1 && info.strides[d] != expected) {
            fail(where, "the buffer is not C-contiguous (the kernels read it as one dense block)");
          }
          expected *= info.shape[d];
        }
        p.*field = reinterpret_cast<T>(info.ptr);
        p.*nbytes = static_cast<int64_t>(info.size) * static_cast<int64_t>(info.itemsize);
        p.*owner = py::reinterpret_borrow<py::object>(value);
      });
}

template <typename E>
bool buffer_of(const py::buffer_info& info) {
  return info.item_type_is_equivalent_to<E>();
}

template <typename E>
void def_enum(py::class_<BoundParams>& cls, const char* name, E MixImagesParams::*field, int max_code) {
  cls.def_property(
      name, [field](const BoundParams& p) { return static_cast<int>(p.*field); },
      [field, name, max_code](BoundParams& p, int code) {
        if (code < 0 || code > max_code) {
          throw std::invalid_argument(std::string(name) + ": unknown code " + std::to_string(code));
        }
        p.*field = static_cast<E>(code);
      });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixnn_fast native kernels: the fused neighbour mixer (CPU/OpenMP, CUDA)";

  py::class_<BoundParams> params(
      m, "MixImagesParams",
      "Pointers, sizes and layouts of one mix_images call.\n\n"
      "A pointer is set from an int (an address) or from a C-contiguous buffer (a NumPy array...),\n"
      "which also records its size. For an address, declare the buffer's size in <name>_nbytes\n"
      "(-1: undeclared, unchecked). Every call checks the sizes against the buffers before running;\n"
      "mix_images_cpu checks every index against num_images too, while the CUDA kernel (and its\n"
      "emulation) checks them as it runs: rows with a bad index come out NaN and are reported.");
  params.def(py::init<>());
  def_pointer(params, "images", &MixImagesParams::images, &BoundParams::images_nbytes, &BoundParams::images_owner,
              false, nullptr, nullptr);
  def_pointer(params, "anchors", &MixImagesParams::anchors, &BoundParams::anchors_nbytes, &BoundParams::anchors_owner,
              false, buffer_of<int64_t>, "int64");
  def_pointer(params, "partners", &MixImagesParams::partners, &BoundParams::partners_nbytes,
              &BoundParams::partners_owner, false, buffer_of<int64_t>, "int64");
  def_pointer(params, "weights", &MixImagesParams::weights, &BoundParams::weights_nbytes, &BoundParams::weights_owner,
              false, buffer_of<float>, "float32");
  def_pointer(params, "mean", &MixImagesParams::mean, &BoundParams::mean_nbytes, &BoundParams::mean_owner, false,
              buffer_of<float>, "float32");
  def_pointer(params, "inv_std", &MixImagesParams::inv_std, &BoundParams::inv_std_nbytes, &BoundParams::inv_std_owner,
              false, buffer_of<float>, "float32");
  def_pointer(params, "out", &MixImagesParams::out, &BoundParams::out_nbytes, &BoundParams::out_owner, true, nullptr,
              nullptr);
  def_enum(params, "in_dtype", &MixImagesParams::in_dtype, 3);
  def_enum(params, "out_dtype", &MixImagesParams::out_dtype, 3);
  def_enum(params, "in_layout", &MixImagesParams::in_layout, 1);
  def_enum(params, "out_layout", &MixImagesParams::out_layout, 1);
  params.def_readwrite("num_images", &BoundParams::num_images)
      .def_readwrite("height", &BoundParams::height)
      .def_readwrite("width", &BoundParams::width)
      .def_readwrite("channels", &BoundParams::channels)
      .def_readwrite("batch", &BoundParams::batch)
      .def_readwrite("num_partners", &BoundParams::num_partners)
      .def_readwrite("images_nbytes", &BoundParams::images_nbytes)
      .def_readwrite("anchors_nbytes", &BoundParams::anchors_nbytes)
      .def_readwrite("partners_nbytes", &BoundParams::partners_nbytes)
      .def_readwrite("weights_nbytes", &BoundParams::weights_nbytes)
      .def_readwrite("mean_nbytes", &BoundParams::mean_nbytes)
      .def_readwrite("inv_std_nbytes", &BoundParams::inv_std_nbytes)
      .def_readwrite("out_nbytes", &BoundParams::out_nbytes);

  m.def(
      "mix_images_cpu",
      [](const BoundParams& p, int num_threads) {
        if (!check_host_call(p, "mix_images_cpu")) return;
        py::gil_scoped_release release;
        mixnn::cpu::mix_images(p, num_threads);
      },
      py::arg("params"), py::arg("num_threads"), "Run the OpenMP mixer on host pointers.");

  m.def("cpu_isas", &mixnn::cpu::available_isas,
        "Instruction sets with a CPU kernel that this CPU can run, e.g. ['base', 'avx2', 'avx512'].");
  m.def("select_cpu_isa", &mixnn::cpu::select_isa, py::arg("name"),
        "Use the CPU kernel for 'auto' (best available), 'base', 'avx2' or 'avx512'.");
  m.def("selected_cpu_isa", &mixnn::cpu::selected_isa, "The CPU kernel in use.");

  m.def(
      "mix_images_cuda_emulated",
      [](const BoundParams& p, int64_t grid_x, int64_t grid_y) {
        // 0 = the launcher's grid; otherwise within what a CUDA launch allows
        if (grid_x < 0 || grid_x > INT32_MAX) fail("mix_images_cuda_emulated", "grid_x must lie in [0, 2**31 - 1]");
        if (grid_y < 0 || grid_y > 65535) fail("mix_images_cuda_emulated", "grid_y must lie in [0, 65535]");
        // Like mix_images_cuda: sizes and pointers here, the indices in the kernel body.
        if (!check_host_buffers(p, "mix_images_cuda_emulated")) return index_error_tuple(0, 0);
        mixnn::IndexErrors errors;
        mixnn::MixImagesParams run = p;
        run.index_errors = &errors;
        {
          py::gil_scoped_release release;
          mixnn::emulator::mix_images(run, grid_x, grid_y);
        }
        return index_error_tuple(errors.bad_rows, errors.where);
      },
      py::arg("params"), py::arg("grid_x") = 0, py::arg("grid_y") = 0,
      "Run the CUDA kernel's body on the host over its launch grid (host pointers; for tests).\n\n"
      "Checks sizes and pointers as mix_images_cuda does, and leaves the indices to the kernel\n"
      "body: rows with an index outside [0, num_images) are written as NaN (0 for uint8).\n"
      "Returns (bad rows, row, term) of those rows: (0, None, None) when there were none, else\n"
      "their number and the (row, term) of the last one met (term 0 = the anchor, j = partner j-1).");

  m.def(
      "cuda_launch_config",
      [](const BoundParams& p) {
        checked_spans(p, "cuda_launch_config");  // sizes only: nothing is read
        const auto c = mixnn::cuda_body::mix_images_launch_config(p);
        return py::make_tuple(py::make_tuple(c.grid.x, c.grid.y, c.grid.z),
                              py::make_tuple(c.block.x, c.block.y, c.block.z));
      },
      py::arg("params"), "((grid x, y, z), (block x, y, z)) the CUDA launcher uses for these params.");

#ifdef MIXNN_WITH_CUDA
  m.def(
      "mix_images_cuda",
      [](const BoundParams& p, std::intptr_t stream) {
        if (!check_cuda_call(p, "mix_images_cuda")) return;
        py::gil_scoped_release release;
        mixnn::cuda::mix_images(p, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Launch the CUDA mixer on device pointers and a cudaStream_t, on the current device.\n\n"
      "Sizes and pointers are checked here; indices by the kernel, without waiting for the\n"
      "device: rows with an index outside [0, num_images) are written as NaN (0 for uint8),\n"
      "and a later call raises IndexError once their record has come back to the host.");
  m.def(
      "cuda_take_index_errors",
      [](int device) {
        mixnn::cuda::IndexErrorReport report;
        {
          py::gil_scoped_release release;  // waits for the device
          report = mixnn::cuda::take_index_errors(device);
        }
        return index_error_tuple(report.bad_rows, report.where);
      },
      py::arg("device"),
      "Wait for CUDA device `device`, then report the rows with an out-of-range index that its\n"
      "mixer launches met and no earlier report named: (bad rows, row, term) as\n"
      "mix_images_cuda_emulated returns it.  Those rows are then reported.");
  m.def("cuda_compiled", []() { return true; });
  m.def("cuda_device_count", []() { return mixnn::cuda::device_count(); });
#else
  m.def("cuda_compiled", []() { return false; });
  m.def("cuda_device_count", []() { return 0; });
#endif

  mixnn::host::bind(m);  // pooled host outputs for mix_images without out= (cpu/host_buffers.h)

  m.def("build_info", []() {
    py::dict info;
#ifdef MIXNN_WITH_CUDA
    info["cuda_compiled"] = true;
#else
    info["cuda_compiled"] = false;
#endif
    info["openmp"] = _OPENMP;
    info["omp_max_threads"] = omp_get_max_threads();
    info["compiler"] = __VERSION__;
    info["cpu_isas"] = mixnn::cpu::available_isas();
    info["cpu_isa"] = mixnn::cpu::selected_isa();
    return info;
  });
}
