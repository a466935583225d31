// Python module vlmkern._C: the CPU kernels (built on every machine).
// torch/csrc/utils/pybind.h (pybind11 + Tensor/dtype casters) compiles ~3x faster than torch/extension.h.
#include <torch/csrc/utils/pybind.h>

#include "keys.h"
#include "patchify.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "vlmkern CPU kernels";
  m.def("patchify", &vlmkern::patchify_cpu,
        "Fuyu patchify: (B, C, H, W) uint8/float32 pixels -> (B, nP, p*p*C) normalised patches",
        py::arg("pixels"), py::arg("patch_size"), py::arg("pad_value"), py::arg("rescale"),
        py::arg("mean"), py::arg("std"), py::arg("out_dtype") = at::kFloat);
  m.def(
      "argument_key",
      [](py::handle values) {
        PyObject* key = vlmkern::argument_key(values.ptr());
        if (key == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(key);
      },
      "An op's argument key: per tensor (type, scalar type, device type, device index, sizes, strides); "
      "(type, key) per tuple or list; (type, value) otherwise",
      py::arg("values"));
}
