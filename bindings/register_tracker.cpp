#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>
#include <string>

#include "tensor_input.hpp"
#include "zetaguard/sketch_map.hpp"

namespace zetaguard::bindings {
namespace {

// Columns of the array update() returns, one row per tensor.
constexpr int kColumns = 5;  // x2, v2, a2, j2, nonfinite

Mode mode_from_name(const std::string& name) {
    if (name == "exact") return Mode::exact;
    if (name == "sketch") return Mode::sketch;
    throw py::value_error("mode must be 'exact' or 'sketch', got '" + name + "'");
}

Isa isa_from_name(const std::string& name) {
    for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
        if (name == isa_name(isa)) {
            if (!isa_supported(isa))
                throw py::value_error("ISA '" + name + "' is not supported by this CPU or build");
            return isa;
        }
    }
    throw py::value_error("unknown ISA '" + name + "'; expected scalar, avx2 or avx512");
}


// The Python-visible tracker: the engine plus a lock, so two Python threads sharing one guard
// serialise instead of racing on the ring (each call releases the GIL while it computes).
class PyTracker {
public:
    PyTracker(const std::string& mode, std::size_t sketch_buckets, std::size_t min_buckets,
              int threads, std::uint64_t seed)
        : tracker_(make_config(mode, sketch_buckets, min_buckets, threads, seed)) {}

    py::array_t<double> update(const py::sequence& tensors) {
        ParsedInputs in = parse_inputs(tensors, "parameter");
        return run_update(in);
    }

    py::array_t<double> update_raw(const py::sequence& pointers) {
        ParsedInputs in = parse_raw(pointers);
        return run_update(in);
    }

    py::array_t<double> norms(const py::sequence& tensors) {
        ParsedInputs in = parse_inputs(tensors, "tensor");
        return run_norms(in);
    }

    py::array_t<double> norms_raw(const py::sequence& pointers) {
        ParsedInputs in = parse_raw(pointers);
        return run_norms(in);
    }

    // Sum of squares over all tensors (in tensor order) and the non-finite count: what a
    // gradient-norm channel needs, without a per-tensor table.
    py::tuple total_norm(const py::sequence& tensors) {
        ParsedInputs in = parse_inputs(tensors, "tensor");
        return run_total(in);
    }

    py::tuple total_norm_raw(const py::sequence& pointers) {
        ParsedInputs in = parse_raw(pointers);
        return run_total(in);
    }

    py::tuple run_total(ParsedInputs& in) {
        std::vector<Channels> rows;
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            tracker_.norms(in.views, rows);
        }
        return total_of(rows);
    }

    py::array_t<double> run_norms(ParsedInputs& in) {
        std::vector<Channels> rows;
        {
            // Safe without the GIL: the views point into buffers that `in` keeps alive, and
            // nothing below touches a Python object.
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            tracker_.norms(in.views, rows);
        }
        return rows_to_array(rows);
    }

    int history() const { return tracker_.history(); }
    std::string isa() const { return isa_name(tracker_.isa()); }
    int threads() const { return tracker_.config().threads; }
    std::string mode() const { return tracker_.config().mode == Mode::exact ? "exact" : "sketch"; }
    std::size_t state_bytes() const { return tracker_.state_bytes(); }
    std::size_t tensor_count() const { return tracker_.tensor_count(); }
    std::vector<std::size_t> buckets() const {
        std::vector<std::size_t> b;
        for (const auto& t : tracker_.tensors()) b.push_back(t.buckets);
        return b;
    }

    void reset() {
        std::lock_guard<std::mutex> lock(mutex_);
        tracker_.reset();
    }

    py::dict get_state() const {
        py::dict d;
        d["history"] = tracker_.history();
        d["head"] = tracker_.head();
        py::list tensors;
        for (const auto& t : tracker_.tensors()) {
            py::dict e;
            e["numel"] = t.numel;
            e["dtype"] = dtype_name(t.dtype);
            e["buckets"] = t.buckets;
            e["seed"] = t.seed;
            py::list slots;
            for (int s = 0; s < 3; ++s) {
                if (t.buckets == 0) {
                    py::array_t<std::uint8_t> a(static_cast<py::ssize_t>(t.ring[s].size()));
                    if (!t.ring[s].empty())
                        std::memcpy(a.mutable_data(), t.ring[s].data(), t.ring[s].size());
                    slots.append(a);
                } else {
                    py::array_t<double> a(static_cast<py::ssize_t>(t.sketch[s].size()));
                    std::memcpy(a.mutable_data(), t.sketch[s].data(),
                                t.sketch[s].size() * sizeof(double));
                    slots.append(a);
                }
            }
            e["slots"] = slots;
            py::array_t<float> tau(static_cast<py::ssize_t>(t.tau.size()));
            if (!t.tau.empty()) std::memcpy(tau.mutable_data(), t.tau.data(), t.tau.size() * 4);
            e["tau"] = tau;
            tensors.append(e);
        }
        d["tensors"] = tensors;
        return d;
    }

    void set_state(const py::dict& d) {
        std::vector<TensorState> tensors;
        for (const auto& item : d["tensors"].cast<py::list>()) {
            auto e = item.cast<py::dict>();
            TensorState t;
            t.numel = e["numel"].cast<std::size_t>();
            t.dtype = dtype_from_name(e["dtype"].cast<std::string>());
            t.buckets = e["buckets"].cast<std::size_t>();
            t.seed = e["seed"].cast<std::uint64_t>();
            auto slots = e["slots"].cast<py::list>();
            if (slots.size() != 3) throw StateError("corrupt guard state: a ring needs 3 slots");
            for (int s = 0; s < 3; ++s) {
                if (t.buckets == 0) {
                    auto a = slots[s].cast<py::array_t<std::uint8_t, py::array::c_style |
                                                                      py::array::forcecast>>();
                    t.ring[s].assign(a.data(), a.data() + a.size());
                } else {
                    auto a = slots[s].cast<py::array_t<double, py::array::c_style |
                                                                 py::array::forcecast>>();
                    t.sketch[s].assign(a.data(), a.data() + a.size());
                }
            }
            auto tau = e["tau"].cast<py::array_t<float, py::array::c_style | py::array::forcecast>>();
            t.tau.assign(tau.data(), tau.data() + tau.size());
            tensors.push_back(std::move(t));
        }
        std::lock_guard<std::mutex> lock(mutex_);
        tracker_.restore(std::move(tensors), d["history"].cast<int>(), d["head"].cast<int>());
    }

private:
    static TrackerConfig make_config(const std::string& mode, std::size_t sketch_buckets,
                                     std::size_t min_buckets, int threads, std::uint64_t seed) {
        if (threads < 1) throw py::value_error("threads must be at least 1");
        if (sketch_buckets < 1) throw py::value_error("sketch_buckets must be at least 1");
        TrackerConfig c;
        c.mode = mode_from_name(mode);
        c.sketch_buckets = sketch_buckets;
        c.min_buckets = min_buckets;
        c.threads = threads;
        c.seed = seed;
        return c;
    }

    py::array_t<double> run_update(ParsedInputs& in) {
        std::vector<Channels> rows;
        {
            // Safe without the GIL: the views point into buffers that `in` keeps alive until
            // after the GIL is back, and the engine touches no Python object.
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            tracker_.update(in.views, rows);
        }
        return rows_to_array(rows);
    }

    Tracker tracker_;
    std::mutex mutex_;
};

// Test hook: one kernel call on one ISA, returning its lanes, so tests can compare each SIMD
// variant lane by lane with the scalar emulation.
py::dict kernel_lanes(const std::string& kernel, const std::string& isa_name_, int lanes,
                      const py::sequence& arrays) {
    const Isa isa = isa_from_name(isa_name_);
    if (lanes < 1 || lanes > kMaxLanes) throw py::value_error("lanes must be 1..8");
    ParsedInputs in = parse_inputs(arrays, "array");
    for (const auto& v : in.views) {
        if (v.dtype != in.views[0].dtype || v.numel != in.views[0].numel)
            throw py::value_error("all arrays must share dtype and size");
    }
    LaneSums acc;
    py::bytes written;
    if (kernel == "fused") {
        if (in.views.size() != 4) throw py::value_error("fused needs cur, s1, s2, s3");
        const auto& c = in.views[0];
        std::vector<std::uint8_t> out(c.numel * dtype_size(c.dtype));
        fused_pass(isa, lanes, c.dtype, c.data, in.views[1].data, in.views[2].data,
                   in.views[3].data, out.data(), c.numel, acc);
        written = py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    } else if (kernel == "norm") {
        if (in.views.size() != 1) throw py::value_error("norm needs one array");
        norm_pass(isa, lanes, in.views[0].dtype, in.views[0].data, in.views[0].numel, acc);
    } else {
        throw py::value_error("kernel must be 'fused' or 'norm'");
    }
    py::dict d;
    d["lanes"] = acc.lanes;
    d["x2"] = std::vector<double>(acc.x2, acc.x2 + acc.lanes);
    d["v2"] = std::vector<double>(acc.v2, acc.v2 + acc.lanes);
    d["a2"] = std::vector<double>(acc.a2, acc.a2 + acc.lanes);
    d["j2"] = std::vector<double>(acc.j2, acc.j2 + acc.lanes);
    d["nonfinite"] = acc.nonfinite;
    d["written"] = written;
    return d;
}

// Test hook: a sketch of one array into k buckets on one ISA.
py::array_t<double> sketch_buckets(const std::string& isa_name_, const py::sequence& arrays,
                                   std::size_t k, std::uint64_t seed, const py::sequence& tau) {
    const Isa isa = isa_from_name(isa_name_);
    ParsedInputs in = parse_inputs(arrays, "array");
    if (in.views.size() != 1) throw py::value_error("sketch needs one array");
    std::vector<float> signs = tau.cast<std::vector<float>>();
    if (k < 1 || signs.size() != k) throw py::value_error("tau must hold k signs");
    py::array_t<double> out(static_cast<py::ssize_t>(k));
    std::fill(out.mutable_data(), out.mutable_data() + k, 0.0);
    LaneSums acc;
    sketch_pass(isa, native_lanes(isa), in.views[0].dtype, in.views[0].data, 0, in.views[0].numel,
                k, signs.data(), seed, out.mutable_data(), acc);
    return out;
}

// Test hook: where the consumer found an object's data, without copying it.
py::tuple resolve_address(const py::object& obj) {
    py::list one;
    one.append(obj);
    ParsedInputs in = parse_inputs(one, "array");
    const TensorView& v = in.views.at(0);
    return py::make_tuple(reinterpret_cast<std::uintptr_t>(v.data), v.numel,
                          std::string(dtype_name(v.dtype)));
}

}  // namespace

py::array_t<double> rows_to_array(const std::vector<Channels>& rows) {
    py::array_t<double> out({static_cast<py::ssize_t>(rows.size()), py::ssize_t{kColumns}});
    auto m = out.mutable_unchecked<2>();
    for (std::size_t i = 0; i < rows.size(); ++i) {
        const auto r = static_cast<py::ssize_t>(i);
        m(r, 0) = rows[i].x2;
        m(r, 1) = rows[i].v2;
        m(r, 2) = rows[i].a2;
        m(r, 3) = rows[i].j2;
        m(r, 4) = static_cast<double>(rows[i].nonfinite);
    }
    return out;
}

py::tuple total_of(const std::vector<Channels>& rows) {
    double x2 = 0.0;
    std::uint64_t nonfinite = 0;
    for (const Channels& r : rows) {
        x2 += r.x2;
        nonfinite += r.nonfinite;
    }
    return py::make_tuple(x2, nonfinite);
}

void register_tracker(py::module_& m) {
    py::register_exception<StateError>(m, "StateError", PyExc_ValueError);

    py::class_<PyTracker>(m, "Tracker")
        .def(py::init<const std::string&, std::size_t, std::size_t, int, std::uint64_t>(),
             py::arg("mode") = "exact", py::arg("sketch_buckets") = 16384,
             py::arg("min_buckets") = 64, py::arg("threads") = 1,
             py::arg("seed") = 0x5eed)
        .def("update", &PyTracker::update, py::arg("tensors"))
        .def("update_raw", &PyTracker::update_raw, py::arg("pointers"))
        .def("norms", &PyTracker::norms, py::arg("tensors"))
        .def("norms_raw", &PyTracker::norms_raw, py::arg("pointers"))
        .def("total_norm", &PyTracker::total_norm, py::arg("tensors"))
        .def("total_norm_raw", &PyTracker::total_norm_raw, py::arg("pointers"))
        .def("reset", &PyTracker::reset)
        .def("get_state", &PyTracker::get_state)
        .def("set_state", &PyTracker::set_state, py::arg("state"))
        .def_property_readonly("history", &PyTracker::history)
        .def_property_readonly("isa", &PyTracker::isa)
        .def_property_readonly("threads", &PyTracker::threads)
        .def_property_readonly("mode", &PyTracker::mode)
        .def_property_readonly("state_bytes", &PyTracker::state_bytes)
        .def_property_readonly("tensor_count", &PyTracker::tensor_count)
        .def_property_readonly("buckets", &PyTracker::buckets);

    m.def("supported_isas", [] {
        std::vector<std::string> out;
        for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
            if (isa_supported(isa)) out.emplace_back(isa_name(isa));
        return out;
    });
    m.def("best_isa", [] { return std::string(isa_name(best_isa())); });
    m.def("_kernel_lanes", &kernel_lanes, py::arg("kernel"), py::arg("isa"), py::arg("lanes"),
          py::arg("arrays"));
    m.def("_resolve_address", &resolve_address, py::arg("obj"));
    m.def("_sketch_buckets", &sketch_buckets, py::arg("isa"), py::arg("arrays"), py::arg("k"),
          py::arg("seed"), py::arg("tau"));
    // The sketch map's constants (sketch_map.hpp), so the device path computes the same map
    // without a second copy of them.
    m.def("sketch_constants", [] {
        py::dict d;
        d["splitmix_golden"] = kSplitmixGolden;
        d["splitmix_mul1"] = kSplitmixMul1;
        d["splitmix_mul2"] = kSplitmixMul2;
        d["tau_mul"] = kTauMul;
        d["chunk_mul"] = kChunkMul;
        d["rotation_granule"] = kRotationGranule;
        d["min_compression"] = kSketchMinCompression;
        return d;
    });
}

}  // namespace zetaguard::bindings
