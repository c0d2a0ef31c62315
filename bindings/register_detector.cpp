// zetaguard._core.Detector: the calibrated stability score (cpp/src/detector.cpp) for Python.
//
// observe() is on every monitored step's path, so it returns a plain tuple and builds its dicts
// from interned key strings; the saved state is a JSON-able dict (the guard's save format).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "tensor_input.hpp"
#include "zetaguard/detector.hpp"

namespace zetaguard::bindings {
namespace {

using RowArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

constexpr std::size_t kChannels = static_cast<std::size_t>(Channel::count);
constexpr std::size_t kScores = static_cast<std::size_t>(Score::count);

// Interned dict keys and status strings, made once and kept for the life of the process
// (deliberately never released: module teardown order would otherwise matter).
struct Keys {
    PyObject* channel[kChannels];
    PyObject* score[kScores];
    PyObject* score_channel[kScores];  // "score_<name>": scores as they appear among channels
    PyObject* status[3];
};

const Keys& keys() {
    static const Keys* k = [] {
        auto* made = new Keys;
        for (std::size_t i = 0; i < kChannels; ++i)
            made->channel[i] = PyUnicode_InternFromString(channel_name(static_cast<Channel>(i)));
        for (std::size_t i = 0; i < kScores; ++i) {
            const char* name = score_name(static_cast<Score>(i));
            made->score[i] = PyUnicode_InternFromString(name);
            made->score_channel[i] = PyUnicode_InternFromString(("score_" + std::string(name)).c_str());
        }
        const char* statuses[3] = {"STABLE", "DRIFT", "CRITICAL"};
        for (int i = 0; i < 3; ++i) made->status[i] = PyUnicode_InternFromString(statuses[i]);
        return made;
    }();
    return *k;
}

void set_item(py::dict& d, PyObject* key, double value) {
    py::float_ v(value);
    if (PyDict_SetItem(d.ptr(), key, v.ptr()) != 0) throw py::error_already_set();
}

py::object optional_float(const std::optional<double>& v) {
    return v ? py::object(py::float_(*v)) : py::object(py::none());
}

std::optional<double> optional_from(const py::handle& h) {
    if (h.is_none()) return std::nullopt;
    return h.cast<double>();
}

py::object list_or_none(const std::optional<std::vector<double>>& v) {
    return v ? py::object(py::cast(*v)) : py::object(py::none());
}

Calibration calibration_from(const std::string& name) {
    if (name == "auto") return Calibration::automatic;
    if (name == "none") return Calibration::none;
    throw py::value_error("calibration must be 'auto' or 'none', got '" + name + "'");
}

// The Python-visible detector. Every call holds the GIL throughout (the work is a few scalar
// operations per group, not worth releasing it for), so calls are already serialised and the
// reused Observation is never read while another call writes it.
class PyDetector {
public:
    PyDetector(double drift, double snap, double alpha, int warmup, const std::string& calibration)
        : detector_(make(drift, snap, alpha, warmup, calibration)) {}

    // (status, zeta, raw_jar, smoothed_jar, confidence, channels, scores, group_zeta,
    //  nonfinite, in_warmup); channels end with the scores as "score_<name>".
    py::tuple observe(const RowArray& rows, int history, std::optional<double> loss,
                      std::optional<double> grad_norm) {
        if (rows.ndim() != 2 || rows.shape(1) != static_cast<py::ssize_t>(kRowWidth))
            throw py::value_error("rows must have shape (groups, 5): x2, v2, a2, j2, nonfinite");
        const auto groups = static_cast<std::size_t>(rows.shape(0));
        detector_.observe(rows.data(), groups, history, loss, grad_norm, obs_);
        const Keys& k = keys();
        py::dict channels, scores;
        for (std::size_t i = 0; i < kChannels; ++i)
            if (obs_.channels[i]) set_item(channels, k.channel[i], *obs_.channels[i]);
        for (std::size_t i = 0; i < kScores; ++i) {
            if (!obs_.scores[i]) continue;
            set_item(scores, k.score[i], *obs_.scores[i]);
            set_item(channels, k.score_channel[i], *obs_.scores[i]);
        }
        py::array_t<double> group_zeta(static_cast<py::ssize_t>(groups));
        std::copy(obs_.group_zeta.begin(), obs_.group_zeta.end(), group_zeta.mutable_data());
        return py::make_tuple(
            py::reinterpret_borrow<py::str>(k.status[static_cast<int>(obs_.status)]),
            obs_.zeta, optional_float(obs_.raw_jar), optional_float(obs_.smoothed_jar),
            obs_.confidence, std::move(channels), std::move(scores), std::move(group_zeta),
            obs_.nonfinite, obs_.in_warmup);
    }

    void reset() { detector_.reset(); }

    void restart_trajectory() { detector_.restart_trajectory(); }
    // A tentative observation (the tiered pipeline, python/zetaguard/tiered.py): keep the
    // state, observe on the cheap tier's estimates, and if that reaches DRIFT put the state
    // back and observe again on full data, so a step is learned from once.
    void checkpoint() { saved_ = detector_.state(); }
    void rollback() { detector_.state() = saved_; }

    const DetectorConfig& config() const { return detector_.config(); }
    std::int64_t steps() const { return detector_.state().steps; }
    bool in_warmup() const { return detector_.in_warmup(); }
    double confidence() const { return detector_.confidence(); }

    // The learned state as plain JSON-able values (the layout save_state() has always used).
    py::dict get_state() const {
        const DetectorState& s = detector_.state();
        py::dict d;
        d["steps"] = s.steps;
        d["smoothed_jar"] = optional_float(s.smoothed_jar);
        d["first_param_norm"] = optional_float(s.first_param_norm);
        d["first_loss"] = optional_float(s.first_loss);
        py::dict tracks;
        for (std::size_t i = 0; i < static_cast<std::size_t>(Tracked::count); ++i) {
            const Track& t = s.tracks[i];
            py::list entry;  // [mean, dev, n]
            entry.append(t.mean);
            entry.append(t.dev);
            entry.append(static_cast<double>(t.n));
            tracks[tracked_name(static_cast<Tracked>(i))] = entry;
        }
        d["tracks"] = tracks;
        py::dict trend;
        for (std::int8_t which : s.trend_order) {
            if (which < 0 || !s.trend[static_cast<std::size_t>(which)]) continue;
            const auto& t = *s.trend[static_cast<std::size_t>(which)];
            py::list pair;
            pair.append(t[0]);
            pair.append(t[1]);
            trend[which == 0 ? "loss" : "grad"] = pair;
        }
        d["trend"] = trend;
        d["last_log_norm"] = optional_float(s.last_log_norm);
        d["growth"] = s.growth;
        d["growth_base"] = optional_float(s.growth_base);
        d["growth_samples"] = py::cast(s.growth_samples);
        d["group_first_norm"] = list_or_none(s.group_first_norm);
        d["group_log_update"] = list_or_none(s.group_log_update);
        d["group_samples"] = py::cast(s.group_samples);
        return d;
    }

    void set_state(const py::dict& d) {
        DetectorState s;
        try {
            s.steps = d["steps"].cast<std::int64_t>();
            s.smoothed_jar = optional_from(d["smoothed_jar"]);
            s.first_param_norm = optional_from(d["first_param_norm"]);
            s.first_loss = optional_from(d["first_loss"]);
            auto tracks = d["tracks"].cast<py::dict>();
            for (std::size_t i = 0; i < static_cast<std::size_t>(Tracked::count); ++i) {
                auto t = tracks[tracked_name(static_cast<Tracked>(i))].cast<std::vector<double>>();
                if (t.size() != 3) throw StateError("corrupt guard state (detector): a track needs [mean, dev, n]");
                s.tracks[i] = Track{t[0], t[1], static_cast<std::int64_t>(t[2])};
            }
            std::size_t order = 0;
            for (auto item : d["trend"].cast<py::dict>()) {
                const auto name = item.first.cast<std::string>();
                if (name != "loss" && name != "grad") throw StateError("corrupt guard state (detector): unknown trend " + name);
                const std::size_t which = name == "loss" ? 0 : 1;
                auto pair = item.second.cast<std::vector<double>>();
                if (pair.size() != 2 || order >= 2) throw StateError("corrupt guard state (detector): a trend needs [fast, slow]");
                s.trend[which] = std::array<double, 2>{pair[0], pair[1]};
                s.trend_order[order++] = static_cast<std::int8_t>(which);
            }
            s.last_log_norm = optional_from(d["last_log_norm"]);
            s.growth = d["growth"].cast<double>();
            s.growth_base = optional_from(d["growth_base"]);
            s.growth_samples = d["growth_samples"].cast<std::vector<double>>();
            if (!d["group_first_norm"].is_none())
                s.group_first_norm = d["group_first_norm"].cast<std::vector<double>>();
            if (!d["group_log_update"].is_none())
                s.group_log_update = d["group_log_update"].cast<std::vector<double>>();
            s.group_samples = d["group_samples"].cast<std::vector<std::vector<double>>>();
        } catch (const py::error_already_set& e) {
            throw StateError(std::string("corrupt guard state (detector): ") + e.what());
        } catch (const py::cast_error& e) {
            throw StateError(std::string("corrupt guard state (detector): ") + e.what());
        }
        detector_.state() = std::move(s);
    }

private:
    static Detector make(double drift, double snap, double alpha, int warmup,
                         const std::string& calibration) {
        DetectorConfig c;
        c.drift_threshold = drift;
        c.snap_threshold = snap;
        c.alpha = alpha;
        c.warmup_steps = warmup;
        c.calibration = calibration_from(calibration);
        try {
            return Detector(c);
        } catch (const std::invalid_argument& e) {
            throw py::value_error(e.what());
        }
    }

    Detector detector_;
    DetectorState saved_;
    Observation obs_;  // reused: observe() allocates nothing in steady state
};

// Per-tensor rows summed into per-group rows (group_of[i] names tensor i's group).
py::array_t<double> group_rows(const RowArray& rows,
                               const py::array_t<std::int64_t, py::array::c_style |
                                                                   py::array::forcecast>& group_of,
                               std::size_t groups) {
    if (rows.ndim() != 2 || rows.shape(1) != static_cast<py::ssize_t>(kRowWidth))
        throw py::value_error("rows must have shape (tensors, 5)");
    if (group_of.ndim() != 1 || group_of.shape(0) != rows.shape(0))
        throw py::value_error("group_of needs one group index per row");
    std::vector<double> out;
    try {
        sum_rows_by_group(rows.data(), static_cast<std::size_t>(rows.shape(0)), group_of.data(),
                          groups, out);
    } catch (const std::out_of_range& e) {
        throw py::value_error(e.what());
    }
    py::array_t<double> result({static_cast<py::ssize_t>(groups), static_cast<py::ssize_t>(kRowWidth)});
    std::copy(out.begin(), out.end(), result.mutable_data());
    return result;
}

py::dict constants() {
    using namespace detection;
    py::dict ratio;
    ratio["update"] = kUpdateRatio;
    ratio["accel"] = kAccelRatio;
    ratio["grad"] = kGradRatio;
    ratio["loss"] = kLossRatio;
    ratio["loss_start"] = kLossStartRatio;
    ratio["param"] = kParamRatio;
    py::dict d;
    d["critical_ratio"] = ratio;
    d["noise_sigmas"] = kNoiseSigmas;
    d["track_rate"] = kTrackRate;
    d["loss_floor"] = kLossFloor;
    d["gate_fast"] = kGateFast;
    d["gate_slow"] = kGateSlow;
    d["gate_margin"] = kGateMargin;
    d["growth_rate"] = kGrowthRate;
    d["growth_floor"] = kGrowthFloor;
    d["growth_ratio"] = kGrowthRatio;
    d["min_calibration_samples"] = kMinCalibrationSamples;
    d["jar_eps"] = kJarEps;
    return d;
}

}  // namespace

void register_detector(py::module_& m) {
    py::class_<PyDetector>(m, "Detector")
        .def(py::init<double, double, double, int, const std::string&>(),
             py::arg("drift_threshold"), py::arg("snap_threshold"), py::arg("alpha"),
             py::arg("warmup_steps"), py::arg("calibration") = "auto")
        .def("observe", &PyDetector::observe, py::arg("rows"), py::arg("history"),
             py::arg("loss") = py::none(), py::arg("grad_norm") = py::none())
        .def("reset", &PyDetector::reset)
        .def("restart_trajectory", &PyDetector::restart_trajectory)
        .def("checkpoint", &PyDetector::checkpoint)
        .def("rollback", &PyDetector::rollback)
        .def("confidence", &PyDetector::confidence)
        .def("get_state", &PyDetector::get_state)
        .def("set_state", &PyDetector::set_state, py::arg("state"))
        .def_property_readonly("steps", &PyDetector::steps)
        .def_property_readonly("in_warmup", &PyDetector::in_warmup)
        .def_property_readonly("drift_threshold",
                               [](const PyDetector& d) { return d.config().drift_threshold; })
        .def_property_readonly("snap_threshold",
                               [](const PyDetector& d) { return d.config().snap_threshold; })
        .def_property_readonly("alpha", [](const PyDetector& d) { return d.config().alpha; })
        .def_property_readonly("warmup_steps",
                               [](const PyDetector& d) { return d.config().warmup_steps; })
        .def_property_readonly("calibration", [](const PyDetector& d) {
            return d.config().calibration == Calibration::none ? "none" : "auto";
        });
    m.def("group_rows", &group_rows, py::arg("rows"), py::arg("group_of"), py::arg("groups"));
    m.def("detector_constants", &constants);
}

}  // namespace zetaguard::bindings
