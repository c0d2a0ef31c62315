#include "zetaguard/detector.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace zetaguard {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kSqrt2 = std::sqrt(2.0);

constexpr std::size_t idx(Tracked t) { return static_cast<std::size_t>(t); }

// NaN-ignoring maximum, as NumPy's fmax: a NaN argument yields the other one.
double fmax_nan(double a, double b) {
    if (std::isnan(a)) return b;
    if (std::isnan(b)) return a;
    return a < b ? b : a;
}

// Python's max(a, b) on floats: keeps `a` unless `b` is strictly larger (NaN never is).
double py_max(double a, double b) { return b > a ? b : a; }
double py_min(double a, double b) { return b < a ? b : a; }

void add_sample(Track& t, double log_value, std::optional<double> rate) {
    t.n += 1;
    const double r = rate ? *rate : 1.0 / static_cast<double>(t.n);  // plain mean while learning
    if (t.n > 1) {
        const double err = log_value - t.mean;
        t.mean += r * err;
        t.dev += r * (std::fabs(err) - t.dev);
    } else {
        t.mean += log_value;
    }
}

double track_score(const Track& t, double log_value, double ratio, double floor) {
    if (t.n < detection::kMinCalibrationSamples) return 0.0;
    const double base = py_max(t.mean, floor);
    return py_max(0.0, (log_value - base) / (std::log(ratio) + detection::kNoiseSigmas * t.dev));
}

// Median of one column of `samples`, NaN when any sample is NaN (as numpy.median).
double column_median(const std::vector<std::vector<double>>& samples, std::size_t col,
                     std::vector<double>& scratch) {
    scratch.clear();
    for (const auto& s : samples) {
        const double v = col < s.size() ? s[col] : kNaN;
        if (std::isnan(v)) return kNaN;
        scratch.push_back(v);
    }
    const std::size_t n = scratch.size();
    if (n == 0) return kNaN;
    std::sort(scratch.begin(), scratch.end());
    return n % 2 ? scratch[n / 2] : (scratch[n / 2 - 1] + scratch[n / 2]) / 2.0;
}

}  // namespace

const char* channel_name(Channel c) noexcept {
    switch (c) {
        case Channel::param_norm: return "param_norm";
        case Channel::update_norm: return "update_norm";
        case Channel::accel_norm: return "accel_norm";
        case Channel::grad_norm: return "grad_norm";
        case Channel::loss: return "loss";
        case Channel::update_overshoot: return "update_overshoot";
        case Channel::update_gate: return "update_gate";
        case Channel::count: break;
    }
    return "?";
}

const char* score_name(Score s) noexcept {
    switch (s) {
        case Score::param: return "param";
        case Score::loss_start: return "loss_start";
        case Score::update: return "update";
        case Score::accel: return "accel";
        case Score::grad: return "grad";
        case Score::loss: return "loss";
        case Score::growth: return "growth";
        case Score::nonfinite: return "nonfinite";
        case Score::jar: return "jar";
        case Score::count: break;
    }
    return "?";
}

const char* tracked_name(Tracked t) noexcept {
    switch (t) {
        case Tracked::update: return "update";
        case Tracked::accel: return "accel";
        case Tracked::grad: return "grad";
        case Tracked::loss: return "loss";
        case Tracked::count: break;
    }
    return "?";
}

double detection::critical_ratio(Tracked t) noexcept {
    switch (t) {
        case Tracked::update: return kUpdateRatio;
        case Tracked::accel: return kAccelRatio;
        case Tracked::grad: return kGradRatio;
        case Tracked::loss: return kLossRatio;
        case Tracked::count: break;
    }
    return 1.0;
}

Status status_for(double zeta, double drift_threshold, double snap_threshold) noexcept {
    if (std::isnan(zeta) || zeta >= snap_threshold) return Status::critical;
    if (zeta >= drift_threshold) return Status::drift;
    return Status::stable;
}

void sum_rows_by_group(const double* rows, std::size_t tensors, const std::int64_t* group_of,
                       std::size_t groups, std::vector<double>& out) {
    out.assign(groups * kRowWidth, 0.0);
    for (std::size_t i = 0; i < tensors; ++i) {
        const auto g = group_of[i];
        if (g < 0 || static_cast<std::size_t>(g) >= groups)
            throw std::out_of_range("group index " + std::to_string(g) + " outside 0.." +
                                    std::to_string(groups));
        for (std::size_t c = 0; c < kRowWidth; ++c)
            out[static_cast<std::size_t>(g) * kRowWidth + c] += rows[i * kRowWidth + c];
    }
}

Detector::Detector(DetectorConfig config) : config_(config) {
    if (!(config.alpha > 0.0 && config.alpha <= 1.0))
        throw std::invalid_argument("alpha must be in (0, 1], got " + std::to_string(config.alpha));
    if (config.warmup_steps < 0)
        throw std::invalid_argument("warmup_steps must be >= 0, got " +
                                    std::to_string(config.warmup_steps));
    if (!(config.drift_threshold > 0.0 && config.drift_threshold <= config.snap_threshold))
        throw std::invalid_argument(
            "thresholds must satisfy 0 < drift_threshold <= snap_threshold, got drift=" +
            std::to_string(config.drift_threshold) + ", snap=" +
            std::to_string(config.snap_threshold));
}

double Detector::confidence() const noexcept {
    const auto steps = static_cast<double>(state_.steps);
    if (config_.calibration == Calibration::none) return state_.steps >= 4 ? 1.0 : 0.0;
    if (config_.warmup_steps == 0) return 1.0;
    const double warmup = config_.warmup_steps;
    const double done = py_min(1.0, steps / warmup);
    const double after = py_max(0.0, steps - warmup);
    return 0.8 * done + 0.2 * (1.0 - std::exp(-after / warmup));
}

void Detector::observe(const double* rows, std::size_t groups, int history,
                       std::optional<double> loss, std::optional<double> grad_norm,
                       Observation& out) {
    state_.steps += 1;
    out.channels.fill(std::nullopt);
    out.scores.fill(std::nullopt);
    out.raw_jar.reset();
    out.group_zeta.assign(groups, 0.0);
    out.nonfinite = 0;

    // Totals in row order (what a NumPy sum over the group axis does).
    double x2 = 0, v2 = 0, a2 = 0, j2 = 0, nf = 0;
    for (std::size_t g = 0; g < groups; ++g) {
        const double* r = rows + g * kRowWidth;
        x2 += r[0];
        v2 += r[1];
        a2 += r[2];
        j2 += r[3];
        nf += r[4];
    }
    const bool bad = nf > 0 || !std::isfinite(x2) || (loss && !std::isfinite(*loss)) ||
                     (grad_norm && !std::isfinite(*grad_norm));
    out.nonfinite = static_cast<std::uint64_t>(nf);
    const double x = std::isfinite(x2) ? std::sqrt(x2) : kInf;
    std::optional<double> v, a;
    if (history >= 1 && std::isfinite(v2)) v = std::sqrt(v2);
    if (history >= 2 && std::isfinite(a2)) a = std::sqrt(a2);
    if (history >= 3) out.raw_jar = bad ? kNaN : std::sqrt(j2) / (std::sqrt(a2) + detection::kJarEps);
    if (out.raw_jar && std::isfinite(*out.raw_jar)) {
        const double raw = *out.raw_jar;
        state_.smoothed_jar = state_.smoothed_jar
                                  ? config_.alpha * raw + (1.0 - config_.alpha) * *state_.smoothed_jar
                                  : raw;
    }
    out.channel(Channel::param_norm) = x;
    out.channel(Channel::update_norm) = v;
    out.channel(Channel::accel_norm) = a;
    out.channel(Channel::grad_norm) = grad_norm;
    out.channel(Channel::loss) = loss;

    if (bad) {
        for (std::size_t g = 0; g < groups; ++g) {
            const double* r = rows + g * kRowWidth;
            bool broken = r[4] > 0;
            for (std::size_t c = 0; c < kRowWidth; ++c) broken = broken || !std::isfinite(r[c]);
            if (broken) out.group_zeta[g] = kInf;
        }
        out.zeta = kInf;
        out.score(Score::nonfinite) = kInf;
        finish(out);
        return;
    }

    if (config_.calibration == Calibration::none) {
        out.zeta = state_.smoothed_jar.value_or(0.0);
        if (history >= 3) {
            for (std::size_t g = 0; g < groups; ++g) {
                const double* r = rows + g * kRowWidth;
                out.group_zeta[g] = std::sqrt(r[3]) / (std::sqrt(r[2]) + detection::kJarEps);
            }
        }
        out.score(Score::jar) = out.zeta;
        finish(out);
        return;
    }

    if (!state_.first_param_norm && x > 0) state_.first_param_norm = x;
    if (!state_.first_loss && loss && *loss > 0) state_.first_loss = *loss;
    std::array<std::optional<double>, 4> logs{};
    const std::array<std::optional<double>, 4> values{v, a, grad_norm, loss};
    for (std::size_t i = 0; i < 4; ++i)
        if (values[i] && *values[i] > 0) logs[i] = std::log(*values[i]);

    const double g8 = gate(logs);
    track_growth(x, history);

    // Scores, in the order zeta's maximum visits them.
    if (state_.first_param_norm && x > 0)
        out.score(Score::param) = py_max(
            0.0, std::log(x / *state_.first_param_norm) / std::log(detection::kParamRatio));
    const auto& log_loss = logs[idx(Tracked::loss)];
    if (state_.first_loss && log_loss)
        out.score(Score::loss_start) =
            py_max(0.0, (*log_loss - std::log(*state_.first_loss)) /
                            std::log(detection::kLossStartRatio));
    const double loss_floor = state_.first_loss
                                  ? std::log(detection::kLossFloor * *state_.first_loss)
                                  : -kInf;
    constexpr Score kTrackedScore[4] = {Score::update, Score::accel, Score::grad, Score::loss};
    for (std::size_t i = 0; i < 4; ++i) {
        if (!logs[i]) continue;
        const auto t = static_cast<Tracked>(i);
        const double floor = t == Tracked::loss ? loss_floor : -kInf;
        const double s = track_score(state_.tracks[i], *logs[i], detection::critical_ratio(t), floor);
        out.score(kTrackedScore[i]) = (t == Tracked::update || t == Tracked::accel) ? s * g8 : s;
    }
    if (state_.growth_base && state_.growth > *state_.growth_base)
        out.score(Score::growth) =
            std::log(state_.growth / *state_.growth_base) / std::log(detection::kGrowthRatio);

    const Track& upd = state_.tracks[idx(Tracked::update)];
    if (logs[idx(Tracked::update)] && upd.n >= detection::kMinCalibrationSamples)
        // how many times its tracked level the update is (what an LR cut must undo)
        out.channel(Channel::update_overshoot) = std::exp(*logs[idx(Tracked::update)] - upd.mean);

    std::optional<double> top;
    for (const auto& s : out.scores)
        if (s) top = top ? py_max(*top, *s) : *s;
    out.zeta = kSqrt2 * top.value_or(0.0);
    group_scores(rows, groups, history, g8, out.group_zeta);
    learn(logs, top.value_or(0.0));
    out.channel(Channel::update_gate) = g8;
    finish(out);
}

void Detector::finish(Observation& out) const {
    out.status = status_for(out.zeta, config_.drift_threshold, config_.snap_threshold);
    out.smoothed_jar = state_.smoothed_jar;
    out.confidence = confidence();
    out.in_warmup = in_warmup();
}

// 1 unless the loss (else the gradient norm) is clearly falling; updates the trend.
double Detector::gate(const std::array<std::optional<double>, 4>& logs) {
    std::size_t which;
    if (logs[idx(Tracked::loss)]) {
        which = 0;
    } else if (logs[idx(Tracked::grad)]) {
        which = 1;
    } else {
        return 1.0;
    }
    const double value = which == 0 ? *logs[idx(Tracked::loss)] : *logs[idx(Tracked::grad)];
    auto& trend = state_.trend[which];
    if (!trend) {
        trend = std::array<double, 2>{value, value};
        auto& order = state_.trend_order;
        (order[0] < 0 ? order[0] : order[1]) = static_cast<std::int8_t>(which);
        return 1.0;
    }
    auto& t = *trend;
    t[0] += detection::kGateFast * (value - t[0]);
    t[1] += detection::kGateSlow * (value - t[1]);
    const double falling = t[1] - t[0];  // > 0 while the loss falls
    return py_min(1.0, py_max(0.0, 1.0 - (falling - detection::kGateMargin) / detection::kGateMargin));
}

void Detector::track_growth(double x, int history) {
    if (x <= 0 || !std::isfinite(x)) return;
    const double log_norm = std::log(x);
    // history 0 after the first step means the trajectory restarted (a rollback): the norm
    // change across it is no growth.
    if (state_.last_log_norm && history > 0) {
        state_.growth += detection::kGrowthRate * (log_norm - *state_.last_log_norm - state_.growth);
        if (in_warmup()) {
            state_.growth_samples.push_back(std::fabs(state_.growth));
        } else if (!state_.growth_base) {
            double mean = 0.0;
            if (!state_.growth_samples.empty()) {
                double sum = 0.0;
                for (double s : state_.growth_samples) sum += s;
                mean = sum / static_cast<double>(state_.growth_samples.size());
            }
            state_.growth_base = py_max(mean, detection::kGrowthFloor);
            state_.growth_samples.clear();
        }
    }
    state_.last_log_norm = log_norm;
}

void Detector::learn(const std::array<std::optional<double>, 4>& logs, double top_score) {
    // Learning depends on the score, never on the user's thresholds: the zeta sequence is the
    // same whatever the thresholds, so raising snap_threshold cannot add a CRITICAL.
    std::optional<double> rate;
    if (in_warmup()) {
        rate.reset();
    } else if (top_score < 0.5) {
        rate = detection::kTrackRate;
    } else if (top_score < 1.0) {
        rate = detection::kTrackRate / 10.0;
    } else {
        return;
    }
    for (std::size_t i = 0; i < 4; ++i) {
        if (!logs[i]) continue;
        Track& t = state_.tracks[i];
        add_sample(t, *logs[i], t.n >= config_.warmup_steps ? rate : std::nullopt);
    }
}

// Per-group zeta from the group's own parameter norm and (gated) update norm.
void Detector::group_scores(const double* rows, std::size_t groups, int history, double gate,
                            std::vector<double>& out) {
    if (groups == 0) return;
    auto& first = state_.group_first_norm;
    if (!first || first->size() != groups) {
        first.emplace(groups);
        for (std::size_t g = 0; g < groups; ++g) {
            const double norm = std::sqrt(rows[g * kRowWidth]);
            (*first)[g] = norm > 0 ? norm : kNaN;
        }
    }
    const double log_param = std::log(detection::kParamRatio);
    const double log_update_ratio = std::log(detection::kUpdateRatio);
    for (std::size_t g = 0; g < groups; ++g) {
        const double norm = std::sqrt(rows[g * kRowWidth]);
        // NaN (a zero first norm) scores 0; inf stays inf.
        out[g] = fmax_nan(std::log(norm / (*first)[g]) / log_param, 0.0);
    }
    if (history >= 1) {
        std::vector<double> log_update(groups);
        for (std::size_t g = 0; g < groups; ++g)
            log_update[g] = std::log(std::sqrt(rows[g * kRowWidth + 1]));
        auto& base = state_.group_log_update;
        if (in_warmup()) {
            state_.group_samples.push_back(log_update);
        } else if (!base && !state_.group_samples.empty()) {
            base.emplace(groups);
            std::vector<double> scratch;
            for (std::size_t g = 0; g < groups; ++g)
                (*base)[g] = column_median(state_.group_samples, g, scratch);
            state_.group_samples.clear();
        }
        if (base && gate > 0.0 && base->size() == groups) {
            for (std::size_t g = 0; g < groups; ++g) {
                const double upd = (log_update[g] - (*base)[g]) / log_update_ratio;
                out[g] = fmax_nan(out[g], gate * fmax_nan(upd, 0.0));
            }
        }
    }
    for (auto& z : out) z *= kSqrt2;
}

}  // namespace zetaguard
