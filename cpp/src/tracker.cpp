#include "zetaguard/tracker.hpp"

#include <algorithm>
#include <initializer_list>
#include <sstream>

#include "zetaguard/sketch_map.hpp"

namespace zetaguard {
namespace {

// Elements per work item in exact mode: big enough to amortise scheduling, small enough that
// two threads share a 25M-element tensor evenly. A multiple of every lane count, so lanes line
// up across items; fixed, so results do not depend on the thread count.
constexpr std::size_t kExactChunk = std::size_t{1} << 16;
constexpr std::size_t kSketchPartElems = std::size_t{1} << 18;
constexpr std::size_t kMaxSketchParts = 8;

template <class T>
void partial_exact_typed(const T* cur, const T* s1, const T* s2, T* out, std::size_t n, int history,
                         Channels& c) {
    for (std::size_t i = 0; i < n; ++i) {
        const double x0 = to_double(cur[i]);
        c.x2 += x0 * x0;
        const double z = x0 * 0.0;
        c.nonfinite += (z != z);
        if (history >= 1) {
            const double d1 = x0 - to_double(s1[i]);
            c.v2 += d1 * d1;
            if (history >= 2) {
                const double a = d1 - (to_double(s1[i]) - to_double(s2[i]));
                c.a2 += a * a;
            }
        }
        out[i] = cur[i];
    }
}

// The first steps of a run, before three snapshots exist: plain scalar code, run three times.
void partial_exact(DType dt, const void* cur, const void* s1, const void* s2, void* out,
                   std::size_t n, int history, Channels& c) {
    switch (dt) {
        case DType::f32:
            partial_exact_typed(static_cast<const float*>(cur), static_cast<const float*>(s1),
                                static_cast<const float*>(s2), static_cast<float*>(out), n,
                                history, c);
            break;
        case DType::f64:
            partial_exact_typed(static_cast<const double*>(cur), static_cast<const double*>(s1),
                                static_cast<const double*>(s2), static_cast<double*>(out), n,
                                history, c);
            break;
        case DType::f16:
            partial_exact_typed(static_cast<const f16_t*>(cur), static_cast<const f16_t*>(s1),
                                static_cast<const f16_t*>(s2), static_cast<f16_t*>(out), n,
                                history, c);
            break;
        case DType::bf16:
            partial_exact_typed(static_cast<const bf16_t*>(cur), static_cast<const bf16_t*>(s1),
                                static_cast<const bf16_t*>(s2), static_cast<bf16_t*>(out), n,
                                history, c);
            break;
    }
}

void add_lanes(const LaneSums& s, Channels& c) noexcept {
    for (int l = 0; l < s.lanes; ++l) {
        c.x2 += s.x2[l];
        c.v2 += s.v2[l];
        c.a2 += s.a2[l];
        c.j2 += s.j2[l];
    }
    c.nonfinite += s.nonfinite;
}

// ||v||^2, ||a||^2, ||j||^2 of a tensor's sketch ring holding `History` earlier sketches.
// Local accumulators in four chains: accumulating straight into `c` made every bucket a store
// and a reload (as far as the compiler knows, `c` may alias the ring).
template <int History>
void sketch_differences(const double* x0, const double* x1, const double* x2, const double* x3,
                        std::size_t k, Channels& c) noexcept {
    constexpr std::size_t kChains = 4;
    double v2[kChains] = {}, a2[kChains] = {}, j2[kChains] = {};
    auto bucket = [&](std::size_t b, std::size_t l) {
        const double d1 = x0[b] - x1[b];
        v2[l] += d1 * d1;
        if constexpr (History >= 2) {
            const double d2 = x1[b] - x2[b];
            const double a = d1 - d2;
            a2[l] += a * a;
            if constexpr (History >= 3) {
                const double jerk = a - (d2 - (x2[b] - x3[b]));
                j2[l] += jerk * jerk;
            }
        }
    };
    std::size_t b = 0;
    for (; b + kChains <= k; b += kChains) {
        for (std::size_t l = 0; l < kChains; ++l) bucket(b + l, l);
    }
    for (; b < k; ++b) bucket(b, 0);
    for (std::size_t l = 0; l < kChains; ++l) {
        c.v2 += v2[l];
        c.a2 += a2[l];
        c.j2 += j2[l];
    }
}

template <class Byte>
Byte* at(std::vector<std::uint8_t>& v, std::size_t offset) noexcept {
    return reinterpret_cast<Byte*>(v.data() + offset);
}

}  // namespace

std::size_t TensorState::state_bytes() const noexcept {
    std::size_t b = tau.size() * sizeof(float);
    for (int s = 0; s < 3; ++s) b += ring[s].size() + sketch[s].size() * sizeof(double);
    return b;
}

Tracker::Tracker(TrackerConfig config) : config_(config), isa_(best_isa()) {
    lanes_ = native_lanes(isa_);
    if (config_.threads < 1) config_.threads = 1;
    if (config_.mode == Mode::sketch && config_.sketch_buckets < 1)
        throw std::invalid_argument("sketch_buckets must be at least 1");
    if (config_.min_buckets < 1) config_.min_buckets = 1;
}

std::size_t Tracker::buckets_for(std::size_t numel, std::size_t total,
                                 const TrackerConfig& config) noexcept {
    if (total == 0) return 0;
    const long double share =
        static_cast<long double>(config.sketch_buckets) * numel / static_cast<long double>(total);
    std::size_t k = std::max<std::size_t>(config.min_buckets, static_cast<std::size_t>(share));
    k = (k + kRotationGranule - 1) / kRotationGranule * kRotationGranule;  // whole SIMD vectors
    // Sketching streams all k buckets once per chunk of k elements: it only beats the exact
    // ring (five streams of the tensor) once it compresses by several times, so a tensor whose
    // share is over an eighth of its size is kept exactly (its ring is then at most ~3.5x the
    // sketch it replaces, and state stays O(sketch_buckets)).
    return k * kSketchMinCompression > numel ? 0 : k;
}

void Tracker::reset() noexcept {
    tensors_.clear();
    history_ = 0;
    head_ = -1;
}

std::size_t Tracker::state_bytes() const noexcept {
    std::size_t b = 0;
    for (const auto& t : tensors_) b += t.state_bytes();
    return b;
}

void Tracker::initialise(const std::vector<TensorView>& tensors) {
    std::size_t total = 0;
    for (const auto& t : tensors) total += t.numel;
    tensors_.clear();
    tensors_.resize(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        TensorState& s = tensors_[i];
        s.numel = tensors[i].numel;
        s.dtype = tensors[i].dtype;
        s.seed = splitmix64(config_.seed + kSplitmixGolden * (i + 1));
        s.buckets = config_.mode == Mode::sketch ? buckets_for(s.numel, total, config_) : 0;
        if (s.buckets == 0) {
            for (auto& r : s.ring) r.assign(s.numel * dtype_size(s.dtype), 0);
        } else {
            for (auto& r : s.sketch) r.assign(s.buckets, 0.0);
            s.tau.resize(s.buckets);
            for (std::size_t p = 0; p < s.buckets; ++p)
                s.tau[p] = (splitmix64(s.seed ^ (p * kTauMul)) >> 63) ? -1.0f : 1.0f;
        }
    }
}

void Tracker::check_same_set(const std::vector<TensorView>& tensors) const {
    if (tensors.size() != tensors_.size()) {
        std::ostringstream m;
        m << "the monitored set changed: the guard tracks " << tensors_.size()
          << " tensors but this step passed " << tensors.size()
          << "; pass the same parameters every step, or call reset() after changing the model";
        throw StateError(m.str());
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const TensorState& s = tensors_[i];
        if (tensors[i].numel != s.numel || tensors[i].dtype != s.dtype) {
            std::ostringstream m;
            m << "tensor " << i << " changed from " << s.numel << " x " << dtype_name(s.dtype)
              << " to " << tensors[i].numel << " x " << dtype_name(tensors[i].dtype)
              << " between steps; call reset() after resizing or casting the model";
            throw StateError(m.str());
        }
    }
}

void Tracker::run_items(std::size_t n, std::size_t total_elements,
                        const std::function<void(std::size_t)>& fn) {
    if (config_.threads <= 1 || total_elements < config_.parallel_threshold || n < 2) {
        for (std::size_t i = 0; i < n; ++i) fn(i);
        return;
    }
    if (!pool_) pool_ = std::make_unique<ThreadPool>(config_.threads);
    pool_->run(n, fn);
}

void Tracker::update(const std::vector<TensorView>& tensors, std::vector<Channels>& out) {
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (tensors[i].numel > 0 && tensors[i].data == nullptr)
            throw std::invalid_argument("tensor " + std::to_string(i) + " has no data pointer");
    }
    if (history_ == 0 && tensors_.empty()) {
        initialise(tensors);
    } else {
        check_same_set(tensors);
    }
    out.assign(tensors.size(), Channels{});

    // Work items: exact tensors in fixed-size chunks, sketched tensors in up to 8 parts aligned
    // to whole chunks of k (each part sketches into scratch buckets of its own).
    std::vector<WorkItem> items;
    std::size_t total = 0;
    for (std::size_t t = 0; t < tensors.size(); ++t) {
        const TensorState& s = tensors_[t];
        total += s.numel;
        if (s.buckets == 0) {
            for (std::size_t b = 0; b < s.numel; b += kExactChunk)
                items.push_back({t, b, std::min(s.numel, b + kExactChunk)});
        } else {
            const std::size_t chunks = (s.numel + s.buckets - 1) / s.buckets;
            const std::size_t parts = std::clamp<std::size_t>(s.numel / kSketchPartElems, 1,
                                                              std::min(kMaxSketchParts, chunks));
            for (std::size_t p = 0; p < parts; ++p) {
                const std::size_t c0 = chunks * p / parts, c1 = chunks * (p + 1) / parts;
                items.push_back({t, c0 * s.buckets, std::min(s.numel, c1 * s.buckets)});
            }
        }
    }

    const int h = history_;
    const int w = slot_written();
    const int s1 = head_, s2 = (head_ + 2) % 3, s3 = (head_ + 1) % 3;
    std::vector<LaneSums> lane_sums(items.size());
    std::vector<Channels> partial(items.size());
    std::vector<AlignedVector<double>> scratch(items.size());

    auto work = [&](std::size_t i) {
        const WorkItem& it = items[i];
        TensorState& s = tensors_[it.tensor];
        const TensorView& v = tensors[it.tensor];
        const std::size_t es = dtype_size(s.dtype);
        const std::size_t off = it.begin * es, n = it.end - it.begin;
        const auto* cur = static_cast<const std::uint8_t*>(v.data) + off;
        if (s.buckets != 0) {
            scratch[i].assign(s.buckets, 0.0);
            sketch_pass(isa_, lanes_, s.dtype, v.data, it.begin, it.end, s.buckets, s.tau.data(),
                        s.seed, scratch[i].data(), lane_sums[i]);
        } else if (h == 3) {
            fused_pass(isa_, lanes_, s.dtype, cur, at<std::uint8_t>(s.ring[s1], off),
                       at<std::uint8_t>(s.ring[s2], off), at<std::uint8_t>(s.ring[s3], off),
                       at<std::uint8_t>(s.ring[w], off), n, lane_sums[i]);
        } else {
            const std::uint8_t* p1 = h >= 1 ? at<std::uint8_t>(s.ring[s1], off) : nullptr;
            const std::uint8_t* p2 = h >= 2 ? at<std::uint8_t>(s.ring[s2], off) : nullptr;
            partial_exact(s.dtype, cur, p1, p2, at<std::uint8_t>(s.ring[w], off), n, h,
                          partial[i]);
        }
    };

    run_items(items.size(), total, work);

    // Reduce in item order: the result never depends on which thread ran what.
    std::vector<AlignedVector<double>> sketch_now(tensors.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
        const std::size_t t = items[i].tensor;
        add_lanes(lane_sums[i], out[t]);
        Channels& c = out[t];
        c.x2 += partial[i].x2;
        c.v2 += partial[i].v2;
        c.a2 += partial[i].a2;
        c.j2 += partial[i].j2;
        c.nonfinite += partial[i].nonfinite;
        if (!scratch[i].empty()) {
            auto& acc = sketch_now[t];
            if (acc.empty()) {
                acc = std::move(scratch[i]);
            } else {
                for (std::size_t b = 0; b < acc.size(); ++b) acc[b] += scratch[i][b];
            }
        }
    }
    for (std::size_t t = 0; t < tensors.size(); ++t) {
        TensorState& s = tensors_[t];
        if (s.buckets == 0) continue;
        auto& now = sketch_now[t];
        if (now.empty()) now.assign(s.buckets, 0.0);  // an empty tensor
        if (h >= 1) {  // the ring holds h earlier sketches (head_ is -1 before the first)
            const double *x1 = s.sketch[s1].data(), *x2 = s.sketch[s2].data(),
                         *x3 = s.sketch[s3].data();
            if (h == 1) sketch_differences<1>(now.data(), x1, x2, x3, s.buckets, out[t]);
            if (h == 2) sketch_differences<2>(now.data(), x1, x2, x3, s.buckets, out[t]);
            if (h == 3) sketch_differences<3>(now.data(), x1, x2, x3, s.buckets, out[t]);
        }
        s.sketch[w] = std::move(now);
    }
    head_ = w;
    history_ = std::min(h + 1, 3);
}

void Tracker::norms(const std::vector<TensorView>& tensors, std::vector<Channels>& out) {
    std::vector<WorkItem> items;
    std::size_t total = 0;
    for (std::size_t t = 0; t < tensors.size(); ++t) {
        if (tensors[t].numel > 0 && tensors[t].data == nullptr)
            throw std::invalid_argument("tensor " + std::to_string(t) + " has no data pointer");
        total += tensors[t].numel;
        for (std::size_t b = 0; b < tensors[t].numel; b += kExactChunk)
            items.push_back({t, b, std::min(tensors[t].numel, b + kExactChunk)});
    }
    std::vector<LaneSums> lane_sums(items.size());
    auto work = [&](std::size_t i) {
        const WorkItem& it = items[i];
        const TensorView& v = tensors[it.tensor];
        const auto* p = static_cast<const std::uint8_t*>(v.data) + it.begin * dtype_size(v.dtype);
        norm_pass(isa_, lanes_, v.dtype, p, it.end - it.begin, lane_sums[i]);
    };
    run_items(items.size(), total, work);
    out.assign(tensors.size(), Channels{});
    for (std::size_t i = 0; i < items.size(); ++i) add_lanes(lane_sums[i], out[items[i].tensor]);
}

void Tracker::restore(std::vector<TensorState> tensors, int history, int head) {
    if (history < 0 || history > 3)
        throw StateError("corrupt guard state: history must be 0..3, got " +
                         std::to_string(history));
    if (history > 0 && (head < 0 || head > 2))
        throw StateError("corrupt guard state: ring head must be 0..2, got " +
                         std::to_string(head));
    if (history < 3 && history > 0 && head != history - 1)
        throw StateError("corrupt guard state: ring head does not match its history");
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const TensorState& s = tensors[i];
        for (int r = 0; r < 3; ++r) {
            const bool ok = s.buckets == 0
                                ? s.ring[r].size() == s.numel * dtype_size(s.dtype) &&
                                      s.sketch[r].empty()
                                : s.sketch[r].size() == s.buckets && s.ring[r].empty() &&
                                      s.tau.size() == s.buckets;
            if (!ok)
                throw StateError("corrupt guard state: tensor " + std::to_string(i) +
                                 " has a ring slot of the wrong size");
        }
    }
    tensors_ = std::move(tensors);
    history_ = history;
    head_ = history == 0 ? -1 : head;
}

}  // namespace zetaguard
