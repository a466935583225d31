// Host-path keys: what an op's argument check and backend selection can depend on, built in C++ because the
// same walk in Python (a dtype, shape, strides and device read per tensor) costs ~5 us per call.
#pragma once

#include <Python.h>

namespace vlmkern {

// values: a tuple or list. Returns one flat tuple: per value its type, then
//   tensor (any subclass): scalar type, device type, device index, rank, sizes, strides
//   tuple / list:          length, then the items' own entries (recursively)
//   anything else:         the value itself
// Raises RuntimeError for a tensor without strides (sparse, nested) or with symbolic sizes, as reading
// .stride() / concrete sizes would in Python. Returns nullptr with the Python error set on failure.
PyObject* argument_key(PyObject* values);

}  // namespace vlmkern
