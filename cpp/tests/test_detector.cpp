// Detector tests that need no Python: the literal rule (JAR as specified), non-finite input,
// the warm-up calibration catching a blow-up, threshold semantics, and the group sums. The NumPy
// statement of the full rule is compared field by field in tests/test_detector_reference.py.
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "zetaguard/detector.hpp"

#include "check.hpp"

using namespace zetaguard;

// One group's row for a calm trajectory: norm ~10, updates ~1e-3 with noise.
static std::vector<double> calm_row(std::mt19937_64& rng, double update_scale = 1.0) {
    std::lognormal_distribution<double> noise(0.0, 0.2);
    const double v2 = 1e-6 * noise(rng) * update_scale * update_scale;
    return {100.0, v2, v2 * noise(rng), v2 * noise(rng) * 1.5, 0.0};
}

static void test_seed_rule_is_smoothed_jar() {
    DetectorConfig c;
    c.calibration = Calibration::none;
    c.alpha = 0.3;
    Detector d(c);
    std::mt19937_64 rng(1);
    Observation o;
    double smoothed = NAN;
    for (int t = 0; t < 30; ++t) {
        auto row = calm_row(rng);
        const int history = t < 3 ? t : 3;
        d.observe(row.data(), 1, history, std::nullopt, std::nullopt, o);
        if (history < 3) {
            CHECK(!o.raw_jar && o.zeta == 0.0, "no JAR before 3 snapshots (step %d)", t);
            continue;
        }
        const double jar = std::sqrt(row[3]) / (std::sqrt(row[2]) + 1e-12);
        smoothed = std::isnan(smoothed) ? jar : 0.3 * jar + 0.7 * smoothed;
        CHECK(o.raw_jar && std::fabs(*o.raw_jar - jar) <= 1e-12 * jar, "raw JAR step %d", t);
        CHECK(std::fabs(o.zeta - smoothed) <= 1e-12 * smoothed, "zeta is smoothed JAR step %d", t);
        CHECK(o.status == status_for(smoothed, c.drift_threshold, c.snap_threshold), "status");
    }
}

static void test_nonfinite_is_critical() {
    Detector d(DetectorConfig{});
    std::mt19937_64 rng(2);
    Observation o;
    for (int t = 0; t < 10; ++t) {
        auto row = calm_row(rng);
        d.observe(row.data(), 1, t < 3 ? t : 3, 1.0, std::nullopt, o);
    }
    std::vector<double> rows = calm_row(rng);
    const auto second = calm_row(rng);
    rows.insert(rows.end(), second.begin(), second.end());
    rows[5 + 4] = 2.0;  // two non-finite values in group 1
    d.observe(rows.data(), 2, 3, 1.0, std::nullopt, o);
    CHECK(o.status == Status::critical && std::isinf(o.zeta), "non-finite values are CRITICAL");
    CHECK(o.nonfinite == 2, "non-finite count %llu", static_cast<unsigned long long>(o.nonfinite));
    CHECK(o.group_zeta[0] == 0.0 && std::isinf(o.group_zeta[1]), "the broken group is named");
    auto row = calm_row(rng);
    d.observe(row.data(), 1, 3, NAN, std::nullopt, o);
    CHECK(o.status == Status::critical, "a NaN loss is CRITICAL");
}

static std::vector<Status> run_blowup(double drift, double snap, int blowup_at) {
    DetectorConfig c;
    c.drift_threshold = drift;
    c.snap_threshold = snap;
    c.warmup_steps = 30;
    Detector d(c);
    std::mt19937_64 rng(3);
    Observation o;
    std::vector<Status> out;
    for (int t = 0; t < 80; ++t) {
        const double scale = t >= blowup_at ? std::pow(3.0, t - blowup_at + 1) : 1.0;
        auto row = calm_row(rng, scale);
        std::lognormal_distribution<double> noise(0.0, 0.1);
        const double loss = std::exp(-0.01 * t) * noise(rng) * (t >= blowup_at + 2 ? 10.0 : 1.0);
        d.observe(row.data(), 1, t < 3 ? t : 3, loss, std::nullopt, o);
        out.push_back(o.status);
    }
    return out;
}

static void test_calibrated_rule_catches_a_blowup_and_respects_thresholds() {
    const auto base = run_blowup(0.707, 1.414, 60);
    bool calm = true;
    for (int t = 0; t < 60; ++t) calm = calm && base[t] != Status::critical;
    CHECK(calm, "no CRITICAL on the calm part");
    bool caught = false;
    for (int t = 60; t < 66; ++t) caught = caught || base[t] == Status::critical;
    CHECK(caught, "updates growing 3x per step are CRITICAL within 6 steps");
    // Raising the snap threshold never adds a CRITICAL; lowering drift never removes a DRIFT.
    const auto higher = run_blowup(0.707, 3.0, 60);
    const auto lower = run_blowup(0.3, 1.414, 60);
    for (std::size_t t = 0; t < base.size(); ++t) {
        CHECK(!(higher[t] == Status::critical && base[t] != Status::critical), "snap step %zu", t);
        CHECK(static_cast<int>(lower[t]) >= static_cast<int>(base[t]), "drift step %zu", t);
    }
}

static void test_restart_keeps_calibration() {
    DetectorConfig c;
    c.warmup_steps = 10;
    Detector d(c);
    std::mt19937_64 rng(4);
    Observation o;
    for (int t = 0; t < 40; ++t) {
        auto row = calm_row(rng);
        d.observe(row.data(), 1, t < 3 ? t : 3, 1.0, 1.0, o);
    }
    const auto tracks = d.state().tracks;
    d.restart_trajectory();
    CHECK(!d.state().smoothed_jar, "the smoothed JAR is forgotten");
    CHECK(d.state().growth_base && d.state().growth == *d.state().growth_base, "growth reset");
    for (std::size_t i = 0; i < tracks.size(); ++i)
        CHECK(d.state().tracks[i].mean == tracks[i].mean && d.state().tracks[i].n == tracks[i].n,
              "calibration kept (track %zu)", i);
}

static void test_bad_config_throws() {
    for (DetectorConfig c : {DetectorConfig{2.0, 1.0, 0.3, 5, Calibration::automatic},
                             DetectorConfig{0.7, 1.4, 0.0, 5, Calibration::automatic},
                             DetectorConfig{0.7, 1.4, 0.3, -1, Calibration::automatic}}) {
        bool threw = false;
        try {
            Detector d(c);
        } catch (const std::invalid_argument&) {
            threw = true;
        }
        CHECK(threw, "bad config must throw");
    }
}

static void test_group_sums() {
    const std::vector<double> rows = {1, 2, 3, 4, 0, 10, 20, 30, 40, 1, 100, 200, 300, 400, 0};
    const std::int64_t group_of[3] = {1, 0, 1};
    std::vector<double> out;
    sum_rows_by_group(rows.data(), 3, group_of, 2, out);
    const std::vector<double> want = {10, 20, 30, 40, 1, 101, 202, 303, 404, 0};
    CHECK(out == want, "group sums");
    const std::int64_t bad[3] = {0, 2, 0};
    bool threw = false;
    try {
        sum_rows_by_group(rows.data(), 3, bad, 2, out);
    } catch (const std::out_of_range&) {
        threw = true;
    }
    CHECK(threw, "a group index out of range throws");
}

int main() {
    test_seed_rule_is_smoothed_jar();
    test_nonfinite_is_critical();
    test_calibrated_rule_catches_a_blowup_and_respects_thresholds();
    test_restart_keeps_calibration();
    test_bad_config_throws();
    test_group_sums();
    if (failures) {
        std::fprintf(stderr, "%d detector check(s) failed\n", failures);
        return 1;
    }
    std::printf("detector tests passed\n");
    return 0;
}
