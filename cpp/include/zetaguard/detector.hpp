// From the engine's per-group sums to a calibrated stability score and a status.
//
// The rule (documented in docs/detection.md and python/zetaguard/detector.py) is
// zeta = sqrt(2) * max(channel scores); each channel compares log(value) with a baseline learned
// over warm-up and followed slowly afterwards, so a score of 0.5 lands on the default drift
// threshold (0.707) and 1.0 on the default snap threshold (1.414). Non-finite input gives inf.
//
// The detector runs once per monitored step on a handful of numbers per group: it lives in C++
// so that a monitor() call costs microseconds, not the tens of microseconds NumPy spends on
// arrays of a few elements.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace zetaguard {

enum class Status : std::uint8_t { stable = 0, drift = 1, critical = 2 };
enum class Calibration : std::uint8_t { automatic = 0, none = 1 };

// The channels a step reports, in the order they are listed to the user.
enum class Channel : std::uint8_t {
    param_norm, update_norm, accel_norm, grad_norm, loss, update_overshoot, update_gate, count
};
// The scores zeta is the maximum of, in the order they are computed.
enum class Score : std::uint8_t {
    param, loss_start, update, accel, grad, loss, growth, nonfinite, jar, count
};
// The tracked (calibrated) inputs, in the order they are read each step.
enum class Tracked : std::uint8_t { update, accel, grad, loss, count };

const char* channel_name(Channel c) noexcept;
const char* score_name(Score s) noexcept;
const char* tracked_name(Tracked t) noexcept;

// Calibration constants (docs/detection.md explains each).
namespace detection {
// Critical ratio R per channel: at R x baseline (plus the noise margin) a channel scores 1.0.
inline constexpr double kUpdateRatio = 10.0;
inline constexpr double kAccelRatio = 10.0;
inline constexpr double kGradRatio = 10.0;
inline constexpr double kLossRatio = 3.0;
inline constexpr double kLossStartRatio = 4.0;
inline constexpr double kParamRatio = 10.0;
inline constexpr double kNoiseSigmas = 3.0;    // mean absolute log deviations added to log(R)
inline constexpr double kTrackRate = 0.02;     // baseline following rate after warm-up
inline constexpr double kLossFloor = 0.1;      // loss baseline never below this x first loss
inline constexpr double kGateFast = 0.3;       // loss-trend short average rate
inline constexpr double kGateSlow = 0.03;      // loss-trend long average rate
inline constexpr double kGateMargin = 0.05;
inline constexpr double kGrowthRate = 0.1;     // averaging rate of d log||x|| per step
inline constexpr double kGrowthFloor = 5e-4;
inline constexpr double kGrowthRatio = 16.0;
inline constexpr int kMinCalibrationSamples = 5;
inline constexpr double kJarEps = 1e-12;       // JAR as specified: ||j|| / (||a|| + eps)
double critical_ratio(Tracked t) noexcept;
}  // namespace detection

struct DetectorConfig {
    double drift_threshold = 0.707;
    double snap_threshold = 1.414;
    double alpha = 0.3;
    int warmup_steps = 50;
    Calibration calibration = Calibration::automatic;
};

// Exponential mean and mean absolute deviation of log(value): a plain mean while learning.
struct Track {
    double mean = 0.0;
    double dev = 0.0;
    std::int64_t n = 0;
};

// Everything the detector learns. Public so the bindings can save and restore it exactly.
struct DetectorState {
    std::int64_t steps = 0;
    std::optional<double> smoothed_jar;
    std::optional<double> first_param_norm;
    std::optional<double> first_loss;
    std::array<Track, static_cast<std::size_t>(Tracked::count)> tracks{};
    // Loss (index 0) and gradient-norm (index 1) trends: {fast, slow} log averages, with the
    // order in which they first appeared (the saved state lists them in that order).
    std::array<std::optional<std::array<double, 2>>, 2> trend{};
    std::array<std::int8_t, 2> trend_order{-1, -1};
    std::optional<double> last_log_norm;
    double growth = 0.0;
    std::optional<double> growth_base;
    std::vector<double> growth_samples;
    std::optional<std::vector<double>> group_first_norm;
    std::optional<std::vector<double>> group_log_update;
    std::vector<std::vector<double>> group_samples;
};

// One step's verdict. Optional values are absent when the history does not define them.
struct Observation {
    Status status = Status::stable;
    double zeta = 0.0;
    std::optional<double> raw_jar;
    std::optional<double> smoothed_jar;
    double confidence = 0.0;
    std::array<std::optional<double>, static_cast<std::size_t>(Channel::count)> channels{};
    std::array<std::optional<double>, static_cast<std::size_t>(Score::count)> scores{};
    std::vector<double> group_zeta;
    std::uint64_t nonfinite = 0;
    bool in_warmup = true;

    std::optional<double>& channel(Channel c) { return channels[static_cast<std::size_t>(c)]; }
    std::optional<double>& score(Score s) { return scores[static_cast<std::size_t>(s)]; }
};

// Rows hold 5 doubles per group: ||x||^2, ||v||^2, ||a||^2, ||j||^2, non-finite count.
inline constexpr std::size_t kRowWidth = 5;

Status status_for(double zeta, double drift_threshold, double snap_threshold) noexcept;

// Sums per-tensor rows into per-group rows: out[group_of[i]] += rows[i] (a NaN stays in its
// own group). `out` is resized to groups * kRowWidth.
void sum_rows_by_group(const double* rows, std::size_t tensors, const std::int64_t* group_of,
                       std::size_t groups, std::vector<double>& out);

class Detector {
public:
    // Throws std::invalid_argument naming the bad setting.
    explicit Detector(DetectorConfig config);

    const DetectorConfig& config() const noexcept { return config_; }
    DetectorState& state() noexcept { return state_; }
    const DetectorState& state() const noexcept { return state_; }
    void reset() { state_ = DetectorState{}; }
    // After a rollback: the trajectory restarts but the calibration stays. The smoothed JAR
    // and the growth average described the blow-up that was just undone.
    void restart_trajectory() noexcept {
        state_.smoothed_jar.reset();
        if (state_.growth_base) state_.growth = *state_.growth_base;
    }

    bool in_warmup() const noexcept { return state_.steps < config_.warmup_steps; }
    // 0 before any JAR exists; rises to 0.8 across warm-up; then approaches 1.
    double confidence() const noexcept;

    // Scores one step. `history` is how many snapshots the engine held before this one.
    void observe(const double* rows, std::size_t groups, int history, std::optional<double> loss,
                 std::optional<double> grad_norm, Observation& out);

private:
    double gate(const std::array<std::optional<double>, 4>& logs);
    void track_growth(double x, int history);
    void learn(const std::array<std::optional<double>, 4>& logs, double top_score);
    void group_scores(const double* rows, std::size_t groups, int history, double gate,
                      std::vector<double>& out);
    void finish(Observation& out) const;

    DetectorConfig config_;
    DetectorState state_;
};

}  // namespace zetaguard
