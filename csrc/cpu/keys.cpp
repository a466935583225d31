#include "keys.h"

#include <vector>

#include <torch/csrc/autograd/python_variable.h>

namespace vlmkern {
namespace {

// The key's items, each a new reference, collected before the one tuple that holds them is built: one flat tuple
// hashes and compares in one pass, where a tuple of tuples (one per argument, two more per tensor) costs an object
// per level to build and a recursive walk per hash and per comparison (~1.5 us per call on a small CPU).
class Items {
 public:
  ~Items() {
    for (PyObject* item : items_) Py_XDECREF(item);
  }
  // Takes the reference; false (the Python error set) when `item` is null.
  bool steal(PyObject* item) {
    if (item == nullptr) return false;
    items_.push_back(item);
    return true;
  }
  bool borrow(PyObject* item) {
    Py_INCREF(item);
    items_.push_back(item);
    return true;
  }
  bool integer(long long value) { return steal(PyLong_FromLongLong(value)); }
  PyObject* tuple() {
    PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(items_.size()));
    if (out == nullptr) return nullptr;
    for (size_t i = 0; i < items_.size(); ++i) PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), items_[i]);
    items_.clear();
    return out;
  }

 private:
  std::vector<PyObject*> items_;
};

bool add_tensor(Items& items, PyObject* value) {
  const at::Tensor& t = THPVariable_Unpack(value);
  if (t.layout() != c10::kStrided || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    PyErr_SetString(PyExc_RuntimeError, "argument_key: a tensor without concrete strides");
    return false;
  }
  const c10::Device device = t.device();
  if (!items.borrow(reinterpret_cast<PyObject*>(Py_TYPE(value))) || !items.integer(static_cast<int>(t.scalar_type()))
      || !items.integer(static_cast<int>(device.type())) || !items.integer(device.index()) || !items.integer(t.dim())) {
    return false;
  }
  for (int64_t size : t.sizes()) {
    if (!items.integer(size)) return false;
  }
  for (int64_t stride : t.strides()) {
    if (!items.integer(stride)) return false;
  }
  return true;
}

// Each value's items start with its type, and the type says how many follow (a tensor's rank, a sequence's length
// are items too): the flat encoding of a sequence of values is unambiguous, so equal keys mean equal values' keys.
bool add_values(Items& items, PyObject* values) {
  PyObject* seq = PySequence_Fast(values, "argument_key: values must be a tuple or list");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** elements = PySequence_Fast_ITEMS(seq);
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < n; ++i) {
    PyObject* v = elements[i];
    if (THPVariable_Check(v)) {
      ok = add_tensor(items, v);
    } else if (PyTuple_Check(v) || PyList_Check(v)) {
      ok = items.borrow(reinterpret_cast<PyObject*>(Py_TYPE(v))) && items.integer(PySequence_Fast_GET_SIZE(v))
           && add_values(items, v);
    } else {
      ok = items.borrow(reinterpret_cast<PyObject*>(Py_TYPE(v))) && items.borrow(v);
    }
  }
  Py_DECREF(seq);
  return ok;
}

}  // namespace

PyObject* argument_key(PyObject* values) {
  Items items;
  return add_values(items, values) ? items.tuple() : nullptr;
}

}  // namespace vlmkern
