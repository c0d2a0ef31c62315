// The sampled block sketch (sampler.hpp): a fixed block plan per tensor, a ring of the
// sampled values, Horvitz-Thompson estimates of the squared norms.
#include "zetaguard/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "zetaguard/sketch_map.hpp"

namespace zetaguard {
namespace {

// A uniform integer in [0, n) from 64 random bits (Lemire's multiply-shift: no division).
std::uint64_t below(std::uint64_t bits, std::uint64_t n) noexcept {
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(bits) * n) >> 64);
}

template <class T>
inline double load(const void* data, std::size_t i) noexcept {
    return to_double(static_cast<const T*>(data)[i]);
}

inline bool nonfinite(double x) noexcept { return !std::isfinite(x); }

// Lanes of independent sums: the compiler may not reorder one double sum (no -ffast-math),
// but it vectorises eight separate ones, and four chains hide the add latency.
constexpr std::size_t kLanes = 8;

// Blocks are scattered, so no hardware prefetcher sees the next one coming: ask for the
// block kAhead places on while this one is summed (its cache lines, at most 16 of them).
constexpr std::size_t kAhead = 2;
template <class T>
inline void prefetch_block(const void* data, std::size_t start, std::size_t block) noexcept {
    const char* p = static_cast<const char*>(data) + start * sizeof(T);
    const std::size_t bytes = std::min<std::size_t>(block * sizeof(T), 1024);
    for (std::size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
}

// One tensor's step while the ring fills (history H = 0, 1, 2: three calls per trajectory; the
// steady state runs on the SIMD kernels), the history fixed at compile time so the inner loop
// has no branch. p1, p2 = x[t-1], x[t-2] as far as H defines them; `write` receives x[t].
template <class T, int H>
void sample_update(const SampleTensor& s, const void* data, const T* p1, const T* p2, T* write,
                   Channels& out) {
    static_assert(H >= 0 && H <= 2, "the steady state (H = 3) is sampled_fused_pass");
    double x2[kLanes] = {}, v2[kLanes] = {}, a2[kLanes] = {};
    std::size_t p = 0;
    auto one = [&](std::size_t l, std::size_t i, std::size_t q) {
        const T raw = static_cast<const T*>(data)[i];
        const double x = to_double(raw);
        x2[l] += x * x;
        if constexpr (H >= 1) {
            const double y1 = to_double(p1[q]);
            const double v = x - y1;
            v2[l] += v * v;
            if constexpr (H >= 2) {
                const double y2 = to_double(p2[q]);
                const double v1 = y1 - y2;
                const double a = v - v1;
                a2[l] += a * a;
            }
        }
        write[q] = raw;
    };
    const std::size_t nb = s.starts.size();
    for (std::size_t b = 0; b < nb; ++b) {
        if (b + kAhead < nb) prefetch_block<T>(data, s.starts[b + kAhead], s.block);
        const std::size_t start = s.starts[b];
        const std::size_t end = std::min(start + s.block, s.numel);
        std::size_t i = start;
        for (; i + kLanes <= end; i += kLanes, p += kLanes)
            for (std::size_t l = 0; l < kLanes; ++l) one(l, i + l, p + l);
        for (std::size_t l = 0; i < end; ++i, ++p, ++l) one(l, i, p);
    }
    double sx = 0, sv = 0, sa = 0;
    for (std::size_t l = 0; l < kLanes; ++l) {
        sx += x2[l];
        sv += v2[l];
        sa += a2[l];
    }
    out.x2 = s.scale * sx;
    out.v2 = s.scale * sv;
    out.a2 = s.scale * sa;
    out.j2 = 0;
    // A non-finite element makes the sum of squares non-finite: count them only then.
    out.nonfinite = 0;
    if (!std::isfinite(sx)) {
        for (std::size_t start : s.starts) {
            const std::size_t end = std::min(start + s.block, s.numel);
            for (std::size_t k = start; k < end; ++k) out.nonfinite += nonfinite(load<T>(data, k));
        }
    }
}

BlockPlan block_plan(const SampleTensor& s) noexcept {
    return BlockPlan{s.starts.data(), s.starts.size(), s.block, s.numel};
}

// Column sums of a pass's lanes, scaled to the whole tensor (Horvitz-Thompson).
void scaled(const SampleTensor& s, const LaneSums& acc, Channels& out) noexcept {
    double sx = 0, sv = 0, sa = 0, sj = 0;
    for (int l = 0; l < acc.lanes; ++l) {
        sx += acc.x2[l];
        sv += acc.v2[l];
        sa += acc.a2[l];
        sj += acc.j2[l];
    }
    out.x2 = s.scale * sx;
    out.v2 = s.scale * sv;
    out.a2 = s.scale * sa;
    out.j2 = s.scale * sj;
    out.nonfinite = acc.nonfinite;
}

template <class F>
void by_dtype(DType d, F&& f) {
    switch (d) {
        case DType::f32: f(float{}); break;
        case DType::f64: f(double{}); break;
        case DType::f16: f(f16_t{}); break;
        case DType::bf16: f(bf16_t{}); break;
    }
}

}  // namespace

Sampler::Sampler(SamplerConfig config)
    : config_(config), plan_config_(config), isa_(best_isa()) {
    if (!(config_.fraction > 0.0 && config_.fraction <= 1.0))
        throw std::invalid_argument("sample fraction must be in (0, 1], got " +
                                    std::to_string(config_.fraction));
    if (config_.block_bytes < 8)
        throw std::invalid_argument("block_bytes must be at least 8");
}

SampleTensor Sampler::plan(const SamplerConfig& config, std::size_t index, std::size_t numel,
                           DType dtype) {
    SampleTensor s;
    s.numel = numel;
    s.dtype = dtype;
    s.block = std::max<std::size_t>(1, config.block_bytes / dtype_size(dtype));
    s.total_blocks = (numel + s.block - 1) / s.block;
    if (s.total_blocks == 0) return s;  // an empty tensor: nothing to read, estimates 0
    const double want = std::ceil(config.fraction * static_cast<double>(s.total_blocks) - 1e-9);
    const std::size_t floor_blocks = (config.min_elements + s.block - 1) / s.block;
    const std::size_t k = std::min(
        s.total_blocks,
        std::max({std::size_t{1}, floor_blocks, static_cast<std::size_t>(want)}));
    std::vector<std::size_t> blocks;
    blocks.reserve(k);
    if (k == s.total_blocks) {
        for (std::size_t b = 0; b < k; ++b) blocks.push_back(b);
    } else {
        // Floyd's algorithm: k distinct blocks, uniformly, in O(k) time and memory.
        std::uint64_t state = splitmix64(config.seed ^ (0x9e3779b97f4a7c15ULL * (index + 1)) ^
                                         (static_cast<std::uint64_t>(numel) << 1));
        std::unordered_set<std::size_t> chosen;
        chosen.reserve(k * 2);
        for (std::size_t j = s.total_blocks - k; j < s.total_blocks; ++j) {
            state = splitmix64(state);
            const std::size_t t = below(state, j + 1);
            const std::size_t pick = chosen.count(t) ? j : t;
            chosen.insert(pick);
            blocks.push_back(pick);
        }
        std::sort(blocks.begin(), blocks.end());
    }
    s.starts.reserve(k);
    for (std::size_t b : blocks) {
        s.starts.push_back(b * s.block);
        s.sampled += std::min(s.block, numel - b * s.block);
    }
    s.scale = static_cast<double>(s.total_blocks) / static_cast<double>(k);
    return s;
}

SamplerConfig Sampler::capped(const std::vector<std::size_t>& numels) const noexcept {
    SamplerConfig c = config_;
    if (c.max_elements == 0) return c;
    double total = 0;
    for (std::size_t n : numels) total += static_cast<double>(n);
    const double cap = static_cast<double>(c.max_elements);
    if (c.fraction * total > cap) c.fraction = cap / total;
    return c;
}

void Sampler::initialise(const std::vector<TensorView>& tensors) {
    std::vector<std::size_t> numels;
    numels.reserve(tensors.size());
    for (const TensorView& t : tensors) numels.push_back(t.numel);
    plan_config_ = capped(numels);
    tensors_.clear();
    tensors_.reserve(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        SampleTensor s = plan(plan_config_, i, tensors[i].numel, tensors[i].dtype);
        for (auto& r : s.ring) r.assign(s.sampled * dtype_size(s.dtype), 0);
        tensors_.push_back(std::move(s));
    }
    history_ = 0;
    head_ = -1;
}

void Sampler::check_same_set(const std::vector<TensorView>& tensors) const {
    // The same words as the full engine's (tracker.cpp): users see one message either way.
    if (tensors.size() != tensors_.size())
        throw StateError("the monitored set changed: the guard tracks " +
                         std::to_string(tensors_.size()) + " tensors but this step passed " +
                         std::to_string(tensors.size()) +
                         "; pass the same parameters every step, or call reset() after "
                         "changing the model");
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (tensors[i].numel != tensors_[i].numel || tensors[i].dtype != tensors_[i].dtype)
            throw StateError("tensor " + std::to_string(i) + " changed from " +
                             std::to_string(tensors_[i].numel) + " x " +
                             dtype_name(tensors_[i].dtype) + " to " +
                             std::to_string(tensors[i].numel) + " x " +
                             dtype_name(tensors[i].dtype) +
                             " between steps; call reset() after resizing or casting the model");
    }
}

void Sampler::update(const std::vector<TensorView>& tensors, std::vector<Channels>& out) {
    if (tensors_.empty() && history_ == 0) initialise(tensors);
    check_same_set(tensors);
    out.assign(tensors.size(), Channels{});
    const int h = history_;
    const int slot = h < 3 ? h : (head_ + 1) % 3;
    const int s1 = head_, s2 = (head_ + 2) % 3, s3 = (head_ + 1) % 3;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        SampleTensor& s = tensors_[i];
        if (s.sampled == 0) continue;
        by_dtype(s.dtype, [&](auto tag) {
            using T = decltype(tag);
            auto slot_of = [&](int k) { return reinterpret_cast<T*>(s.ring[k].data()); };
            const T* p1 = h >= 1 ? slot_of(s1) : nullptr;
            const T* p2 = h >= 2 ? slot_of(s2) : nullptr;
            const T* p3 = h >= 3 ? slot_of(s3) : nullptr;
            T* w = slot_of(slot);
            const void* d = tensors[i].data;
            switch (h) {
                case 0: sample_update<T, 0>(s, d, p1, p2, w, out[i]); break;
                case 1: sample_update<T, 1>(s, d, p1, p2, w, out[i]); break;
                case 2: sample_update<T, 2>(s, d, p1, p2, w, out[i]); break;
                default: {
                    // The steady state, every call after the first three: the SIMD kernel.
                    LaneSums acc;
                    sampled_fused_pass(isa_, native_lanes(isa_), s.dtype, d, block_plan(s), p1,
                                       p2, p3, w, acc);
                    scaled(s, acc, out[i]);
                    break;
                }
            }
        });
    }
    head_ = slot;
    if (history_ < 3) ++history_;
}

void Sampler::norms(const std::vector<TensorView>& tensors, std::vector<Channels>& out) {
    out.assign(tensors.size(), Channels{});
    // Gradients share the parameters' shapes: reuse their plan when it fits, else plan anew.
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const TensorView& t = tensors[i];
        const bool reuse = i < tensors_.size() && tensors_[i].numel == t.numel &&
                           tensors_[i].dtype == t.dtype;
        SampleTensor fresh;
        if (!reuse) fresh = plan(plan_config_, i, t.numel, t.dtype);
        const SampleTensor& s = reuse ? tensors_[i] : fresh;
        if (s.sampled == 0) continue;
        LaneSums acc;
        sampled_norm_pass(isa_, native_lanes(isa_), s.dtype, t.data, block_plan(s), acc);
        scaled(s, acc, out[i]);
    }
}

std::size_t Sampler::state_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& s : tensors_)
        n += 3 * s.ring[0].size() + s.starts.size() * sizeof(std::size_t);
    return n;
}

std::size_t Sampler::sampled_elements() const noexcept {
    std::size_t n = 0;
    for (const auto& s : tensors_) n += s.sampled;
    return n;
}

void Sampler::restore(const std::vector<std::size_t>& numels, const std::vector<DType>& dtypes,
                      std::vector<std::vector<std::uint8_t>> slots, int history, int head) {
    if (numels.size() != dtypes.size() || slots.size() != 3 * numels.size())
        throw StateError("corrupt sampler state: 3 ring slots per tensor are needed");
    const bool reachable = history >= 0 && history <= 3 &&
                           (history < 3 ? head == history - 1 : head >= 0 && head <= 2);
    if (!reachable)
        throw StateError("corrupt sampler state: history " + std::to_string(history) +
                         " with ring head " + std::to_string(head));
    if (numels.empty() && history != 0)
        throw StateError("corrupt sampler state: a history but no tensors");
    const SamplerConfig planned = capped(numels);
    std::vector<SampleTensor> restored;
    restored.reserve(numels.size());
    for (std::size_t i = 0; i < numels.size(); ++i) {
        SampleTensor s = plan(planned, i, numels[i], dtypes[i]);
        const std::size_t bytes = s.sampled * dtype_size(s.dtype);
        for (int k = 0; k < 3; ++k) {
            auto& slot = slots[3 * i + static_cast<std::size_t>(k)];
            if (slot.size() != bytes)
                throw StateError("corrupt sampler state: tensor " + std::to_string(i) +
                                 " ring slot " + std::to_string(k) + " holds " +
                                 std::to_string(slot.size()) + " bytes, its sample plan " +
                                 std::to_string(bytes) +
                                 " (saved with another sample_fraction, max_sampled or seed?)");
            s.ring[k] = std::move(slot);
        }
        restored.push_back(std::move(s));
    }
    tensors_ = std::move(restored);
    plan_config_ = planned;
    history_ = history;
    head_ = head;
}

void Sampler::reset() noexcept {
    tensors_.clear();
    history_ = 0;
    head_ = -1;
}

}  // namespace zetaguard
