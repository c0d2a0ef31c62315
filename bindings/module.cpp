// zetaguard._core: wiring only. Each register_<x>.cpp binds one part of the engine.
#include <pybind11/pybind11.h>

#include "tensor_input.hpp"

PYBIND11_MODULE(_core, m) {
    m.doc() = "zetaguard's compiled engine: finite differences of parameter trajectories";
    zetaguard::bindings::register_tracker(m);
    zetaguard::bindings::register_detector(m);
    zetaguard::bindings::register_sampler(m);
}
