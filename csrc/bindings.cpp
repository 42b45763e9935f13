// All Python bindings of mixnn_fast._C.
//
// Tensors do not cross this boundary as objects: the Python front
// (mixnn_fast/mixer.py) validates them, makes them contiguous and fills a
// MixImagesParams with their data pointers and sizes.  So the extension needs
// neither libtorch nor a particular torch version.  The GIL is released while
// the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/cuda_grid_emulator.h"
#include "cpu/mix_images_cpu.h"
#include "cuda/mix_images_kernel.h"
#include "mix_params.h"
#ifdef MIXNN_WITH_CUDA
#include "cuda/mix_images_cuda.h"
#endif

namespace py = pybind11;
using mixnn::DType;
using mixnn::Layout;
using mixnn::MixImagesParams;

namespace {

// Last line of defence; the Python front has checked shapes, dtypes and index ranges.
void check_params(const MixImagesParams& p) {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument("mix_images: " + message);
  };
  require(p.num_images >= 0 && p.height >= 0 && p.width >= 0 && p.channels >= 0, "image sizes must be >= 0");
  require(p.batch >= 0 && p.num_partners >= 0, "batch and num_partners must be >= 0");
  const bool has_work = p.batch > 0 && p.height * p.width * p.channels > 0;
  if (!has_work) return;
  require(p.num_images > 0, "anchors index an empty image batch");
  require(p.images != nullptr, "images pointer is null");
  require(p.anchors != nullptr, "anchors pointer is null");
  require(p.num_partners == 0 || p.partners != nullptr, "partners pointer is null");
  require(p.weights != nullptr, "weights pointer is null");
  require(p.mean != nullptr && p.inv_std != nullptr, "mean / inv_std pointers are null");
  require(p.out != nullptr, "out pointer is null");
}

template <typename T>
void def_pointer(py::class_<MixImagesParams>& cls, const char* name, T MixImagesParams::*field) {
  cls.def_property(
      name, [field](const MixImagesParams& p) { return reinterpret_cast<std::uintptr_t>(p.*field); },
      [field](MixImagesParams& p, std::uintptr_t address) { p.*field = reinterpret_cast<T>(address); });
}

template <typename E>
void def_enum(py::class_<MixImagesParams>& cls, const char* name, E MixImagesParams::*field, int max_code) {
  cls.def_property(
      name, [field](const MixImagesParams& p) { return static_cast<int>(p.*field); },
      [field, name, max_code](MixImagesParams& p, int code) {
        if (code < 0 || code > max_code) {
          throw std::invalid_argument(std::string(name) + ": unknown code " + std::to_string(code));
        }
        p.*field = static_cast<E>(code);
      });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixnn_fast native kernels: the fused neighbour mixer (CPU/OpenMP, CUDA)";

  py::class_<MixImagesParams> params(m, "MixImagesParams",
                                     "Pointers (as integers), sizes and layouts of one mix_images call.");
  params.def(py::init<>());
  def_pointer(params, "images", &MixImagesParams::images);
  def_pointer(params, "anchors", &MixImagesParams::anchors);
  def_pointer(params, "partners", &MixImagesParams::partners);
  def_pointer(params, "weights", &MixImagesParams::weights);
  def_pointer(params, "mean", &MixImagesParams::mean);
  def_pointer(params, "inv_std", &MixImagesParams::inv_std);
  def_pointer(params, "out", &MixImagesParams::out);
  def_enum(params, "in_dtype", &MixImagesParams::in_dtype, 3);
  def_enum(params, "out_dtype", &MixImagesParams::out_dtype, 3);
  def_enum(params, "in_layout", &MixImagesParams::in_layout, 1);
  def_enum(params, "out_layout", &MixImagesParams::out_layout, 1);
  params.def_readwrite("num_images", &MixImagesParams::num_images)
      .def_readwrite("height", &MixImagesParams::height)
      .def_readwrite("width", &MixImagesParams::width)
      .def_readwrite("channels", &MixImagesParams::channels)
      .def_readwrite("batch", &MixImagesParams::batch)
      .def_readwrite("num_partners", &MixImagesParams::num_partners);

  m.def(
      "mix_images_cpu",
      [](const MixImagesParams& p, int num_threads) {
        check_params(p);
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
      [](const MixImagesParams& p, int64_t grid_x, int64_t grid_y) {
        check_params(p);
        py::gil_scoped_release release;
        mixnn::emulator::mix_images(p, grid_x, grid_y);
      },
      py::arg("params"), py::arg("grid_x") = 0, py::arg("grid_y") = 0,
      "Run the CUDA kernel's body on the host over its launch grid (host pointers; for tests).");

  m.def(
      "cuda_launch_config",
      [](const MixImagesParams& p) {
        const auto c = mixnn::cuda_body::mix_images_launch_config(p);
        return py::make_tuple(py::make_tuple(c.grid.x, c.grid.y, c.grid.z),
                              py::make_tuple(c.block.x, c.block.y, c.block.z));
      },
      py::arg("params"), "((grid x, y, z), (block x, y, z)) the CUDA launcher uses for these params.");

#ifdef MIXNN_WITH_CUDA
  m.def(
      "mix_images_cuda",
      [](const MixImagesParams& p, std::intptr_t stream) {
        check_params(p);
        py::gil_scoped_release release;
        mixnn::cuda::mix_images(p, stream);
      },
      py::arg("params"), py::arg("stream"), "Launch the CUDA mixer on device pointers and a cudaStream_t.");
  m.def("cuda_compiled", []() { return true; });
  m.def("cuda_device_count", []() { return mixnn::cuda::device_count(); });
#else
  m.def("cuda_compiled", []() { return false; });
  m.def("cuda_device_count", []() { return 0; });
#endif

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
