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

// One tensor's step. `slots` = {x[t-1], x[t-2], x[t-3]} as far as `history` defines them;
// `write` is the slot that receives x[t] (it may be the x[t-3] slot: read before written).
template <class T>
void sample_update(const SampleTensor& s, const void* data, int history, const double* p1,
                   const double* p2, const double* p3, double* write, Channels& out) {
    double x2 = 0, v2 = 0, a2 = 0, j2 = 0;
    std::uint64_t nf = 0;
    std::size_t p = 0;
    for (std::size_t start : s.starts) {
        const std::size_t end = std::min(start + s.block, s.numel);
        for (std::size_t i = start; i < end; ++i, ++p) {
            const double x = load<T>(data, i);
            nf += nonfinite(x);
            x2 += x * x;
            if (history >= 1) {
                const double v = x - p1[p];
                v2 += v * v;
                if (history >= 2) {
                    const double v1 = p1[p] - p2[p];
                    const double a = v - v1;
                    a2 += a * a;
                    if (history >= 3) {
                        const double a1 = v1 - (p2[p] - p3[p]);
                        const double j = a - a1;
                        j2 += j * j;
                    }
                }
            }
            write[p] = x;
        }
    }
    out.x2 = s.scale * x2;
    out.v2 = s.scale * v2;
    out.a2 = s.scale * a2;
    out.j2 = s.scale * j2;
    out.nonfinite = nf;
}

template <class T>
void sample_norm(const SampleTensor& s, const void* data, Channels& out) {
    double x2 = 0;
    std::uint64_t nf = 0;
    for (std::size_t start : s.starts) {
        const std::size_t end = std::min(start + s.block, s.numel);
        for (std::size_t i = start; i < end; ++i) {
            const double x = load<T>(data, i);
            nf += nonfinite(x);
            x2 += x * x;
        }
    }
    out = Channels{};
    out.x2 = s.scale * x2;
    out.nonfinite = nf;
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

Sampler::Sampler(SamplerConfig config) : config_(config) {
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
    const std::size_t k = std::min(
        s.total_blocks, std::max<std::size_t>(1, static_cast<std::size_t>(want)));
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

void Sampler::initialise(const std::vector<TensorView>& tensors) {
    tensors_.clear();
    tensors_.reserve(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        SampleTensor s = plan(config_, i, tensors[i].numel, tensors[i].dtype);
        for (auto& r : s.ring) r.assign(s.sampled, 0.0);
        tensors_.push_back(std::move(s));
    }
    history_ = 0;
    head_ = -1;
}

void Sampler::check_same_set(const std::vector<TensorView>& tensors) const {
    if (tensors.size() != tensors_.size())
        throw StateError("the set of monitored tensors changed: " +
                         std::to_string(tensors_.size()) + " before, " +
                         std::to_string(tensors.size()) + " now; reset the guard after changing "
                         "the model");
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (tensors[i].numel != tensors_[i].numel || tensors[i].dtype != tensors_[i].dtype)
            throw StateError("tensor " + std::to_string(i) + " changed size or dtype (" +
                             std::to_string(tensors_[i].numel) + " " +
                             dtype_name(tensors_[i].dtype) + " before, " +
                             std::to_string(tensors[i].numel) + " " +
                             dtype_name(tensors[i].dtype) + " now); reset the guard");
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
        const double* p1 = h >= 1 ? s.ring[s1].data() : nullptr;
        const double* p2 = h >= 2 ? s.ring[s2].data() : nullptr;
        const double* p3 = h >= 3 ? s.ring[s3].data() : nullptr;
        double* w = s.ring[slot].data();
        by_dtype(s.dtype, [&](auto tag) {
            using T = decltype(tag);
            sample_update<T>(s, tensors[i].data, h, p1, p2, p3, w, out[i]);
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
        if (!reuse) fresh = plan(config_, i, t.numel, t.dtype);
        const SampleTensor& s = reuse ? tensors_[i] : fresh;
        if (s.sampled == 0) continue;
        by_dtype(s.dtype, [&](auto tag) {
            using T = decltype(tag);
            sample_norm<T>(s, t.data, out[i]);
        });
    }
}

std::size_t Sampler::state_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& s : tensors_)
        n += 3 * s.sampled * sizeof(double) + s.starts.size() * sizeof(std::size_t);
    return n;
}

std::size_t Sampler::sampled_elements() const noexcept {
    std::size_t n = 0;
    for (const auto& s : tensors_) n += s.sampled;
    return n;
}

void Sampler::reset() noexcept {
    tensors_.clear();
    history_ = 0;
    head_ = -1;
}

}  // namespace zetaguard
