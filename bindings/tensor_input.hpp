// Turning Python objects into engine TensorViews: DLPack capsules (both kinds), the buffer
// protocol, and the raw-pointer form used by adapters that validated their tensors already.
// Everything here runs with the GIL held; the views it returns stay valid while the owners
// vector is alive.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "zetaguard/tracker.hpp"

namespace zetaguard::bindings {

namespace py = pybind11;

// Keeps whatever backs a TensorView alive (a consumed DLPack tensor, a Py_buffer) and releases
// it exactly once.
class InputOwner {
public:
    virtual ~InputOwner() = default;
};

struct ParsedInputs {
    std::vector<TensorView> views;
    std::vector<std::unique_ptr<InputOwner>> owners;
};

// Accepts any sequence of: objects with __dlpack__, DLPack capsules, buffer-protocol objects.
// `what` names the argument in error messages ("parameter", "gradient").
ParsedInputs parse_inputs(const py::sequence& items, const char* what);

// Accepts a sequence of (address, numel, dtype-name) tuples. The caller vouches for them.
ParsedInputs parse_raw(const py::sequence& items);

// The engine dtype for a name ("float32", "bfloat16", ...), or an error listing the choices.
DType dtype_from_name(const std::string& name);

// Per-tensor channel rows as the (n, 5) float64 array Python sees: x2, v2, a2, j2, nonfinite.
py::array_t<double> rows_to_array(const std::vector<Channels>& rows);

// (sum of x2, sum of non-finite counts) over the rows: a total squared norm and its bad values.
py::tuple total_of(const std::vector<Channels>& rows);

void register_tracker(py::module_& m);
void register_detector(py::module_& m);
void register_sampler(py::module_& m);

}  // namespace zetaguard::bindings
