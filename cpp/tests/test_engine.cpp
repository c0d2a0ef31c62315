// Engine tests that need no Python: SIMD lanes vs the scalar emulation, the tracker against a
// direct computation, threading determinism, sketch unbiasedness, and state errors.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "zetaguard/kernels.hpp"
#include "zetaguard/sketch_map.hpp"
#include "zetaguard/tracker.hpp"

#include "check.hpp"

using namespace zetaguard;

static std::uint16_t float_to_bf16(float f) {
    std::uint32_t b;
    std::memcpy(&b, &f, 4);
    return static_cast<std::uint16_t>(b >> 16);
}

// A buffer of `n` values in dtype `dt`, drawn around `centre`, with optional non-finite values.
static std::vector<std::uint8_t> make_buffer(DType dt, std::size_t n, std::mt19937_64& rng,
                                             double centre, bool nonfinite) {
    std::normal_distribution<double> d(centre, 1.0);
    std::vector<std::uint8_t> out(n * dtype_size(dt));
    for (std::size_t i = 0; i < n; ++i) {
        double x = d(rng);
        if (nonfinite && i % 97 == 5) x = (i % 2) ? INFINITY : NAN;
        switch (dt) {
            case DType::f32: { float f = float(x); std::memcpy(&out[i * 4], &f, 4); break; }
            case DType::f64: std::memcpy(&out[i * 8], &x, 8); break;
            case DType::bf16: { std::uint16_t h = float_to_bf16(float(x)); std::memcpy(&out[i * 2], &h, 2); break; }
            case DType::f16: {
                // Pick a random half bit pattern with a finite, moderate exponent (or inf/nan).
                std::uint16_t h = static_cast<std::uint16_t>((rng() & 0x83ffu) | ((10 + rng() % 10) << 10));
                if (nonfinite && i % 97 == 5) h = 0x7c00u | (i % 2 ? 0 : 1);
                std::memcpy(&out[i * 2], &h, 2);
                break;
            }
        }
    }
    return out;
}

static double elem(const std::vector<std::uint8_t>& b, DType dt, std::size_t i) {
    switch (dt) {
        case DType::f32: { float f; std::memcpy(&f, &b[i * 4], 4); return f; }
        case DType::f64: { double d; std::memcpy(&d, &b[i * 8], 8); return d; }
        case DType::f16: { std::uint16_t h; std::memcpy(&h, &b[i * 2], 2); return f16_to_float(h); }
        case DType::bf16: { std::uint16_t h; std::memcpy(&h, &b[i * 2], 2); return bf16_to_float(h); }
    }
    return 0;
}

static bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

static void test_lanes_match_scalar() {
    std::mt19937_64 rng(1);
    for (Isa isa : {Isa::avx2, Isa::avx512}) {
        if (!isa_supported(isa)) {
            std::printf("skip lanes test for %s: not supported here\n", isa_name(isa));
            continue;
        }
        const int L = native_lanes(isa);
        for (DType dt : {DType::f32, DType::f64, DType::f16, DType::bf16}) {
            for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{8},
                                  std::size_t{1031}}) {
                auto c = make_buffer(dt, n, rng, 3.0, true), s1 = make_buffer(dt, n, rng, 3.0, false),
                     s2 = make_buffer(dt, n, rng, 3.0, false), s3 = make_buffer(dt, n, rng, 3.0, false);
                std::vector<std::uint8_t> out_simd(c.size()), out_ref(c.size());
                LaneSums simd, ref;
                fused_pass(isa, L, dt, c.data(), s1.data(), s2.data(), s3.data(), out_simd.data(), n, simd);
                fused_pass(Isa::scalar, L, dt, c.data(), s1.data(), s2.data(), s3.data(), out_ref.data(), n, ref);
                CHECK(simd.lanes == L && ref.lanes == L, "lane counts");
                for (int l = 0; l < L; ++l) {
                    CHECK(same_bits(simd.x2[l], ref.x2[l]) && same_bits(simd.v2[l], ref.v2[l]) &&
                              same_bits(simd.a2[l], ref.a2[l]) && same_bits(simd.j2[l], ref.j2[l]),
                          "%s %s n=%zu lane %d differs", isa_name(isa), dtype_name(dt), n, l);
                }
                CHECK(simd.nonfinite == ref.nonfinite, "%s nonfinite count", isa_name(isa));
                CHECK(out_simd == c && out_ref == c, "%s did not copy the snapshot", isa_name(isa));
                LaneSums ns, nr;
                norm_pass(isa, L, dt, c.data(), n, ns);
                norm_pass(Isa::scalar, L, dt, c.data(), n, nr);
                for (int l = 0; l < L; ++l) CHECK(same_bits(ns.x2[l], nr.x2[l]), "norm lane %d", l);
                CHECK(ns.nonfinite == nr.nonfinite, "norm nonfinite");
            }
        }
    }
}

static void test_tracker_matches_direct(int threads, Mode mode) {
    std::mt19937_64 rng(7);
    TrackerConfig cfg;
    cfg.threads = threads;
    cfg.mode = mode;
    cfg.parallel_threshold = 1000;  // exercise the pool on small data
    Tracker tr(cfg);
    const std::vector<std::size_t> sizes = {1, 300000, 17};
    std::vector<std::vector<std::vector<double>>> hist;  // step -> tensor -> values
    for (int step = 0; step < 6; ++step) {
        std::vector<std::vector<float>> bufs;
        std::vector<TensorView> views;
        std::vector<std::vector<double>> vals;
        for (std::size_t n : sizes) {
            std::vector<float> b(n);
            std::normal_distribution<float> d(0.0f, 1.0f);
            for (auto& x : b) x = 10.0f + 0.01f * d(rng);
            bufs.push_back(b);
        }
        for (auto& b : bufs) {
            views.push_back({b.data(), b.size(), DType::f32});
            vals.emplace_back(b.begin(), b.end());
        }
        hist.push_back(vals);
        std::vector<Channels> out;
        const int h = tr.history();
        CHECK(h == std::min(step, 3), "history %d at step %d", h, step);
        tr.update(views, out);
        for (std::size_t t = 0; t < sizes.size(); ++t) {
            double x2 = 0, v2 = 0, a2 = 0, j2 = 0;
            for (std::size_t i = 0; i < sizes[t]; ++i) {
                auto x = [&](int back) { return hist[step - back][t][i]; };
                x2 += x(0) * x(0);
                if (h >= 1) v2 += std::pow(x(0) - x(1), 2);
                if (h >= 2) a2 += std::pow(x(0) - 2 * x(1) + x(2), 2);
                if (h >= 3) j2 += std::pow(x(0) - 3 * x(1) + 3 * x(2) - x(3), 2);
            }
            const bool exact = tr.tensors()[t].buckets == 0;
            const double tol = exact ? 1e-9 : 0.5;  // one sketch draw: loose; see test_sketch
            auto close = [&](double got, double want) {
                return std::fabs(got - want) <= tol * std::fabs(want) + 1e-12;
            };
            CHECK(close(out[t].x2, x2), "x2 tensor %zu step %d: %g vs %g", t, step, out[t].x2, x2);
            CHECK(close(out[t].v2, v2), "v2 tensor %zu step %d: %g vs %g", t, step, out[t].v2, v2);
            CHECK(close(out[t].a2, a2), "a2 tensor %zu step %d: %g vs %g", t, step, out[t].a2, a2);
            CHECK(close(out[t].j2, j2), "j2 tensor %zu step %d: %g vs %g", t, step, out[t].j2, j2);
        }
    }
}

static void test_threads_deterministic() {
    std::mt19937_64 rng(3);
    std::vector<float> steps[5];
    for (auto& s : steps) {
        s.resize(1 << 20);
        std::normal_distribution<float> d(0.0f, 1.0f);
        for (auto& x : s) x = d(rng);
    }
    for (Mode mode : {Mode::exact, Mode::sketch}) {
        std::vector<Channels> last[2];
        for (int k = 0; k < 2; ++k) {
            TrackerConfig cfg;
            cfg.mode = mode;
            cfg.threads = k == 0 ? 1 : 3;
            Tracker tr(cfg);
            for (auto& s : steps) tr.update({{s.data(), s.size(), DType::f32}}, last[k]);
        }
        CHECK(same_bits(last[0][0].j2, last[1][0].j2) && same_bits(last[0][0].x2, last[1][0].x2),
              "thread count changed the result");
    }
}

static void test_sketch_unbiased() {
    // Mean of ||Sv||^2 over many independent maps approaches ||v||^2, even for a constant v.
    const std::size_t n = 20000;
    std::vector<float> x0(n, 0.0f), x1(n, 1.0f);
    double sum = 0;
    const int trials = 200;
    for (int s = 0; s < trials; ++s) {
        TrackerConfig cfg;
        cfg.mode = Mode::sketch;
        cfg.sketch_buckets = 256;
        cfg.seed = 1000 + s;
        Tracker tr(cfg);
        std::vector<Channels> out;
        tr.update({{x0.data(), n, DType::f32}}, out);
        tr.update({{x1.data(), n, DType::f32}}, out);
        sum += out[0].v2;
    }
    const double mean = sum / trials;
    CHECK(std::fabs(mean / n - 1.0) < 0.05, "sketch mean %g vs %zu", mean, n);
}

static void test_state_errors() {
    Tracker tr(TrackerConfig{});
    std::vector<float> a(10), b(11);
    std::vector<Channels> out;
    tr.update({{a.data(), a.size(), DType::f32}}, out);
    bool threw = false;
    try {
        tr.update({{b.data(), b.size(), DType::f32}}, out);
    } catch (const StateError&) {
        threw = true;
    }
    CHECK(threw, "a resized tensor must raise StateError");
    threw = false;
    try {
        tr.update({}, out);
    } catch (const StateError&) {
        threw = true;
    }
    CHECK(threw, "a dropped tensor must raise StateError");
}

// The division-free mapper must give chunk_map()'s rotation and sign for every chunk: the
// device path and saved sketch states are defined by chunk_map().
static void test_chunk_mapper_is_chunk_map() {
    std::mt19937_64 rng(11);
    std::vector<std::size_t> ks = {1, 2, 3, 7, 8, 9, 64, 88, 96, 4093, 16384, 1u << 20,
                                   (std::size_t{1} << 33) + 8, (std::size_t{1} << 40) + 3};
    for (int i = 0; i < 50; ++i) ks.push_back(1 + rng() % 100000);
    for (std::size_t k : ks) {
        const std::uint64_t seed = rng();
        const ChunkMapper map(seed, k);
        for (int c = 0; c < 2000; ++c) {
            const std::size_t chunk = c < 1000 ? static_cast<std::size_t>(c) : rng() >> (rng() % 64);
            const ChunkMap want = chunk_map(seed, chunk, k), got = map(chunk);
            CHECK(want.offset == got.offset && want.sign == got.sign,
                  "k=%zu chunk=%zu: offset %zu vs %zu", k, chunk, got.offset, want.offset);
        }
    }
}

int main() {
    std::printf("best ISA here: %s\n", isa_name(best_isa()));
    test_chunk_mapper_is_chunk_map();
    test_lanes_match_scalar();
    for (int threads : {1, 2}) {
        test_tracker_matches_direct(threads, Mode::exact);
        test_tracker_matches_direct(threads, Mode::sketch);
    }
    test_threads_deterministic();
    test_sketch_unbiased();
    test_state_errors();
    if (failures) {
        std::printf("%d checks failed\n", failures);
        return 1;
    }
    std::printf("all engine checks passed\n");
    return 0;
}
