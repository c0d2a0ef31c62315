// zetaguard._core.Sampler: the sampled block sketch (cpp/include/zetaguard/sampler.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>
#include <string>

#include "tensor_input.hpp"
#include "zetaguard/sampler.hpp"

namespace zetaguard::bindings {
namespace {

SamplerConfig make_config(double fraction, std::size_t block_bytes, std::uint64_t seed,
                          std::size_t min_elements, std::size_t max_elements) {
    if (!(fraction > 0.0 && fraction <= 1.0))
        throw py::value_error("sample_fraction must be in (0, 1] (for example 1/64), got " +
                              std::to_string(fraction));
    if (block_bytes < 8) throw py::value_error("block_bytes must be at least 8");
    SamplerConfig c;
    c.fraction = fraction;
    c.block_bytes = block_bytes;
    c.seed = seed;
    c.min_elements = min_elements;
    c.max_elements = max_elements;
    return c;
}

// The engine plus a lock (two Python threads sharing a guard serialise on the ring).
class PySampler {
public:
    PySampler(double fraction, std::size_t block_bytes, std::uint64_t seed,
              std::size_t min_elements, std::size_t max_elements)
        : sampler_(make_config(fraction, block_bytes, seed, min_elements, max_elements)) {}

    py::array_t<double> update(const py::sequence& tensors) {
        ParsedInputs in = parse_inputs(tensors, "parameter");
        return run(in, true);
    }
    py::array_t<double> update_raw(const py::sequence& pointers) {
        ParsedInputs in = parse_raw(pointers);
        return run(in, true);
    }
    py::tuple total_norm(const py::sequence& tensors) {
        ParsedInputs in = parse_inputs(tensors, "gradient");
        return total(in);
    }
    py::tuple total_norm_raw(const py::sequence& pointers) {
        ParsedInputs in = parse_raw(pointers);
        return total(in);
    }

    // The block starts of tensor i (tests and the NumPy reference).
    py::dict plan(std::size_t i) const {
        if (i >= sampler_.tensor_count()) throw py::index_error("no such tensor");
        const SampleTensor& s = sampler_.tensors()[i];
        py::dict d;
        d["starts"] = s.starts;
        d["block"] = s.block;
        d["total_blocks"] = s.total_blocks;
        d["scale"] = s.scale;
        d["sampled"] = s.sampled;
        return d;
    }

    int history() const { return sampler_.history(); }
    std::size_t tensor_count() const { return sampler_.tensor_count(); }
    std::size_t state_bytes() const { return sampler_.state_bytes(); }
    std::size_t sampled_elements() const { return sampler_.sampled_elements(); }
    double fraction() const { return sampler_.config().fraction; }
    double effective_fraction() const { return sampler_.effective_fraction(); }
    void reset() {
        std::lock_guard<std::mutex> lock(mutex_);
        sampler_.reset();
    }

    // The ring, for a state file: history, head, and per tensor numel, dtype and 3 slots of
    // the sampled values' bytes (the plans are rebuilt from the config, not saved).
    py::dict get_state() {
        std::lock_guard<std::mutex> lock(mutex_);
        py::dict d;
        d["history"] = sampler_.history();
        d["head"] = sampler_.head();
        py::list tensors;
        for (const auto& t : sampler_.tensors()) {
            py::dict e;
            e["numel"] = t.numel;
            e["dtype"] = dtype_name(t.dtype);
            py::list slots;
            for (const auto& r : t.ring) {
                py::array_t<std::uint8_t> a(static_cast<py::ssize_t>(r.size()));
                if (!r.empty()) std::memcpy(a.mutable_data(), r.data(), r.size());
                slots.append(a);
            }
            e["slots"] = slots;
            tensors.append(e);
        }
        d["tensors"] = tensors;
        return d;
    }

    void set_state(const py::dict& d) {
        std::vector<std::size_t> numels;
        std::vector<DType> dtypes;
        std::vector<std::vector<std::uint8_t>> slots;
        for (const auto& item : d["tensors"].cast<py::list>()) {
            auto e = item.cast<py::dict>();
            numels.push_back(e["numel"].cast<std::size_t>());
            dtypes.push_back(dtype_from_name(e["dtype"].cast<std::string>()));
            auto saved = e["slots"].cast<py::list>();
            if (saved.size() != 3) throw StateError("corrupt sampler state: a ring needs 3 slots");
            for (const auto& slot : saved) {
                auto a = slot.cast<py::array_t<std::uint8_t, py::array::c_style |
                                                                py::array::forcecast>>();
                slots.emplace_back(a.data(), a.data() + a.size());
            }
        }
        std::lock_guard<std::mutex> lock(mutex_);
        sampler_.restore(numels, dtypes, std::move(slots), d["history"].cast<int>(),
                         d["head"].cast<int>());
    }

private:
    py::array_t<double> run(ParsedInputs& in, bool) {
        std::vector<Channels> rows;
        {
            // Safe without the GIL: `in` keeps the buffers alive, the engine touches no Python.
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            sampler_.update(in.views, rows);
        }
        return rows_to_array(rows);
    }
    py::tuple total(ParsedInputs& in) {
        std::vector<Channels> rows;
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            sampler_.norms(in.views, rows);
        }
        return total_of(rows);
    }

    Sampler sampler_;
    std::mutex mutex_;
};

}  // namespace

void register_sampler(py::module_& m) {
    py::class_<PySampler>(m, "Sampler")
        .def(py::init<double, std::size_t, std::uint64_t, std::size_t, std::size_t>(),
             py::arg("fraction") = 1.0 / 64.0, py::arg("block_bytes") = 1024,
             py::arg("seed") = 0x5eed, py::arg("min_elements") = 4096,
             py::arg("max_elements") = 0)
        .def("update", &PySampler::update, py::arg("tensors"))
        .def("update_raw", &PySampler::update_raw, py::arg("pointers"))
        .def("total_norm", &PySampler::total_norm, py::arg("tensors"))
        .def("total_norm_raw", &PySampler::total_norm_raw, py::arg("pointers"))
        .def("plan", &PySampler::plan, py::arg("index"))
        .def("reset", &PySampler::reset)
        .def("get_state", &PySampler::get_state)
        .def("set_state", &PySampler::set_state, py::arg("state"))
        .def_property_readonly("history", &PySampler::history)
        .def_property_readonly("tensor_count", &PySampler::tensor_count)
        .def_property_readonly("state_bytes", &PySampler::state_bytes)
        .def_property_readonly("sampled_elements", &PySampler::sampled_elements)
        .def_property_readonly("fraction", &PySampler::fraction)
        .def_property_readonly("effective_fraction", &PySampler::effective_fraction);
}

}  // namespace zetaguard::bindings
