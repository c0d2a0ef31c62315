// Sampled block sketch tests without Python: the block plan (distinct, aligned, at least one
// block, deterministic), the estimates against a direct computation over the same blocks,
// exactness at fraction 1, and unbiasedness over seeds.
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "zetaguard/sampler.hpp"

#include "check.hpp"

using namespace zetaguard;

static void test_plan() {
    SamplerConfig c;
    c.fraction = 1.0 / 32;
    c.block_bytes = 256;
    c.min_elements = 0;
    for (std::size_t numel : {std::size_t{1}, std::size_t{63}, std::size_t{64}, std::size_t{65},
                              std::size_t{10000}, std::size_t{1} << 20}) {
        SampleTensor s = Sampler::plan(c, 3, numel, DType::f32);
        CHECK(s.block == 64, "f32 blocks of 256 bytes hold 64 elements, got %zu", s.block);
        CHECK(!s.starts.empty(), "at least one block for numel %zu", numel);
        std::set<std::size_t> seen(s.starts.begin(), s.starts.end());
        CHECK(seen.size() == s.starts.size(), "blocks distinct for numel %zu", numel);
        std::size_t want = static_cast<std::size_t>(std::ceil(s.total_blocks / 32.0 - 1e-9));
        if (want < 1) want = 1;
        CHECK(s.starts.size() == want, "numel %zu: %zu blocks, expected %zu", numel,
              s.starts.size(), want);
        for (std::size_t i = 0; i < s.starts.size(); ++i) {
            CHECK(s.starts[i] % s.block == 0, "block start %zu not aligned", s.starts[i]);
            CHECK(s.starts[i] < numel, "block start %zu beyond %zu", s.starts[i], numel);
            if (i) CHECK(s.starts[i] > s.starts[i - 1], "starts ascending");
        }
        SampleTensor again = Sampler::plan(c, 3, numel, DType::f32);
        CHECK(again.starts == s.starts, "the plan is deterministic");
    }
    SamplerConfig floor = c;
    floor.min_elements = 4096;
    SampleTensor f = Sampler::plan(floor, 0, 8192, DType::f32);
    CHECK(f.sampled == 4096, "min_elements: 4096 of 8192 read, got %zu", f.sampled);
    SampleTensor small = Sampler::plan(floor, 0, 1000, DType::f32);
    CHECK(small.sampled == 1000 && small.scale == 1.0, "a small tensor is read whole");
    SampleTensor h = Sampler::plan(c, 0, 1000, DType::bf16);
    CHECK(h.block == 128, "bf16 blocks of 256 bytes hold 128 elements");
    bool threw = false;
    try {
        SamplerConfig bad;
        bad.fraction = 0.0;
        Sampler s(bad);
    } catch (const std::invalid_argument&) {
        threw = true;
    }
    CHECK(threw, "fraction 0 is refused");
}

// Direct computation over the plan's blocks of a trajectory of 4 steps.
static void test_matches_direct() {
    SamplerConfig c;
    c.fraction = 0.1;
    c.min_elements = 0;
    std::mt19937_64 rng(7);
    std::normal_distribution<double> d(0.0, 1.0);
    const std::size_t n = 5000;
    std::vector<std::vector<float>> xs(5, std::vector<float>(n));
    for (auto& x : xs)
        for (auto& e : x) e = static_cast<float>(d(rng));
    Sampler s(c);
    std::vector<Channels> out;
    for (int t = 0; t < 5; ++t) {
        s.update({TensorView{xs[t].data(), n, DType::f32}}, out);
        const SampleTensor& p = s.tensors()[0];
        double x2 = 0, v2 = 0, a2 = 0, j2 = 0;
        for (std::size_t b : p.starts) {
            for (std::size_t i = b; i < std::min(n, b + p.block); ++i) {
                const double x = xs[t][i];
                x2 += x * x;
                if (t >= 1) { const double v = x - xs[t - 1][i]; v2 += v * v; }
                if (t >= 2) {
                    const double a = x - 2.0 * xs[t - 1][i] + xs[t - 2][i];
                    a2 += a * a;
                }
                if (t >= 3) {
                    const double j = x - 3.0 * xs[t - 1][i] + 3.0 * xs[t - 2][i] - xs[t - 3][i];
                    j2 += j * j;
                }
            }
        }
        auto close = [](double a, double b) { return std::fabs(a - b) <= 1e-9 * (1 + std::fabs(b)); };
        CHECK(close(out[0].x2, p.scale * x2), "x2 step %d: %g vs %g", t, out[0].x2, p.scale * x2);
        CHECK(close(out[0].v2, p.scale * v2), "v2 step %d", t);
        CHECK(close(out[0].a2, p.scale * a2), "a2 step %d", t);
        CHECK(close(out[0].j2, p.scale * j2), "j2 step %d", t);
    }
}

static void test_fraction_one_is_exact_and_nonfinite() {
    SamplerConfig c;
    c.fraction = 1.0;
    std::vector<double> x(1000, 2.0);
    Sampler s(c);
    std::vector<Channels> out;
    s.update({TensorView{x.data(), x.size(), DType::f64}}, out);
    CHECK(out[0].x2 == 4000.0, "fraction 1 reads everything: %g", out[0].x2);
    x[5] = NAN;
    s.update({TensorView{x.data(), x.size(), DType::f64}}, out);
    CHECK(out[0].nonfinite == 1, "a NaN in a sampled block is counted");
    bool threw = false;
    try {
        s.update({TensorView{x.data(), 999, DType::f64}}, out);
    } catch (const StateError&) {
        threw = true;
    }
    CHECK(threw, "a changed size is refused");
}

// E[est] = exact over the seeds: the mean of 2000 seeds within 4 standard errors.
static void test_unbiased() {
    std::mt19937_64 rng(11);
    std::gamma_distribution<double> g(0.5, 1.0);  // skewed block totals
    const std::size_t n = 64 * 200;
    std::vector<float> x(n);
    double exact = 0;
    for (auto& e : x) {
        e = static_cast<float>(g(rng));
        exact += double(e) * e;
    }
    double sum = 0, sum2 = 0;
    const int seeds = 2000;
    for (int k = 0; k < seeds; ++k) {
        SamplerConfig c;
        c.fraction = 1.0 / 16;
        c.min_elements = 0;
        c.seed = 1000 + k;
        Sampler s(c);
        std::vector<Channels> out;
        s.update({TensorView{x.data(), n, DType::f32}}, out);
        sum += out[0].x2;
        sum2 += out[0].x2 * out[0].x2;
    }
    const double mean = sum / seeds, var = sum2 / seeds - mean * mean;
    const double se = std::sqrt(var / seeds);
    CHECK(std::fabs(mean - exact) < 4 * se, "unbiased: mean %g exact %g se %g", mean, exact, se);
    CHECK(var > 0, "a real sample has variance");
}

// A restored ring continues exactly as the sampler that was saved; a ring that does not fit
// the plan, or an unreachable (history, head), is refused and leaves the sampler as it was.
static void test_restore() {
    SamplerConfig c;
    c.fraction = 1.0 / 8;
    c.min_elements = 0;
    std::mt19937_64 rng(5);
    std::normal_distribution<float> g;
    std::vector<std::vector<float>> xs(6, std::vector<float>(256 * 40));
    for (auto& x : xs)
        for (auto& e : x) e = g(rng);
    Sampler a(c);
    std::vector<Channels> out_a, out_b;
    for (int t = 0; t < 5; ++t) a.update({TensorView{xs[t].data(), xs[t].size(), DType::f32}}, out_a);
    const SampleTensor& st = a.tensors()[0];
    std::vector<std::vector<std::uint8_t>> slots(st.ring, st.ring + 3);
    Sampler b(c);
    bool threw = false;
    auto short_slots = slots;
    short_slots[1].pop_back();
    try {
        b.restore({xs[0].size()}, {DType::f32}, short_slots, a.history(), a.head());
    } catch (const StateError&) {
        threw = true;
    }
    CHECK(threw && b.tensor_count() == 0, "a slot of the wrong size is refused, nothing changed");
    threw = false;
    try {
        b.restore({xs[0].size()}, {DType::f32}, slots, 2, 0);
    } catch (const StateError&) {
        threw = true;
    }
    CHECK(threw && b.history() == 0, "history 2 needs head 1: refused");
    b.restore({xs[0].size()}, {DType::f32}, slots, a.history(), a.head());
    a.update({TensorView{xs[5].data(), xs[5].size(), DType::f32}}, out_a);
    b.update({TensorView{xs[5].data(), xs[5].size(), DType::f32}}, out_b);
    CHECK(out_a[0].x2 == out_b[0].x2 && out_a[0].v2 == out_b[0].v2 &&
              out_a[0].a2 == out_b[0].a2 && out_a[0].j2 == out_b[0].j2,
          "the restored ring continues exactly: j2 %g vs %g", out_a[0].j2, out_b[0].j2);
}

// max_elements: the sample of a big model stops at the cap, a small one keeps the fraction,
// and a ring saved under a cap is refused by a sampler without it.
static void test_cap() {
    SamplerConfig c;
    c.fraction = 1.0 / 8;
    c.block_bytes = 256;
    c.min_elements = 0;
    c.max_elements = 1024;
    std::vector<float> big(64 * 1024, 1.0f), small(4096, 1.0f);
    Sampler s(c);
    std::vector<Channels> out;
    s.update({TensorView{big.data(), big.size(), DType::f32}}, out);
    CHECK(s.sampled_elements() == 1024, "capped: 1024 of 65536 read, got %zu",
          s.sampled_elements());
    CHECK(s.effective_fraction() == 1024.0 / 65536.0, "effective fraction %g",
          s.effective_fraction());
    CHECK(out[0].x2 == 65536.0, "the estimate scales to the whole tensor: %g", out[0].x2);
    Sampler t(c);
    t.update({TensorView{small.data(), small.size(), DType::f32}}, out);
    CHECK(t.sampled_elements() == 512 && t.effective_fraction() == 1.0 / 8,
          "under the cap the fraction holds: %zu", t.sampled_elements());
    const SampleTensor& st = s.tensors()[0];
    std::vector<std::vector<std::uint8_t>> slots(st.ring, st.ring + 3);
    SamplerConfig uncapped = c;
    uncapped.max_elements = 0;
    Sampler u(uncapped);
    bool threw = false;
    try {
        u.restore({big.size()}, {DType::f32}, slots, s.history(), s.head());
    } catch (const StateError&) {
        threw = true;
    }
    CHECK(threw && u.tensor_count() == 0 && u.effective_fraction() == 1.0 / 8,
          "a capped ring does not fit an uncapped plan: refused, nothing changed");
    Sampler v(c);
    v.restore({big.size()}, {DType::f32}, slots, s.history(), s.head());
    CHECK(v.sampled_elements() == 1024 && v.effective_fraction() == s.effective_fraction(),
          "restored under the same cap");
}

int main() {
    test_cap();
    test_restore();
    test_plan();
    test_matches_direct();
    test_fraction_one_is_exact_and_nonfinite();
    test_unbiased();
    if (failures) {
        std::printf("%d checks failed\n", failures);
        return 1;
    }
    std::printf("all sampler checks passed\n");
    return 0;
}
