#include "keys.h"

#include <torch/csrc/autograd/python_variable.h>

namespace vlmkern {
namespace {

PyObject* int_tuple(c10::IntArrayRef values) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(values.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* item = PyLong_FromLongLong(values[i]);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

PyObject* tensor_key(PyObject* value) {
  const at::Tensor& t = THPVariable_Unpack(value);
  if (t.layout() != c10::kStrided || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    PyErr_SetString(PyExc_RuntimeError, "argument_key: a tensor without concrete strides");
    return nullptr;
  }
  const c10::Device device = t.device();
  PyObject* sizes = int_tuple(t.sizes());
  PyObject* strides = sizes == nullptr ? nullptr : int_tuple(t.strides());
  if (strides == nullptr) {
    Py_XDECREF(sizes);
    return nullptr;
  }
  // "N" steals the size and stride tuples; "O" takes a new reference to the type.
  return Py_BuildValue("(OiiiNN)", reinterpret_cast<PyObject*>(Py_TYPE(value)), static_cast<int>(t.scalar_type()),
                       static_cast<int>(device.type()), static_cast<int>(device.index()), sizes, strides);
}

}  // namespace

PyObject* argument_key(PyObject* values) {
  PyObject* seq = PySequence_Fast(values, "argument_key: values must be a tuple or list");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) {
    Py_DECREF(seq);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = items[i];
    PyObject* item;
    if (THPVariable_Check(v)) {
      item = tensor_key(v);
    } else if (PyTuple_Check(v) || PyList_Check(v)) {
      PyObject* inner = argument_key(v);
      item = inner == nullptr ? nullptr : Py_BuildValue("(ON)", reinterpret_cast<PyObject*>(Py_TYPE(v)), inner);
    } else {
      item = Py_BuildValue("(OO)", reinterpret_cast<PyObject*>(Py_TYPE(v)), v);
    }
    if (item == nullptr) {
      Py_DECREF(out);
      Py_DECREF(seq);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i, item);
  }
  Py_DECREF(seq);
  return out;
}

}  // namespace vlmkern
