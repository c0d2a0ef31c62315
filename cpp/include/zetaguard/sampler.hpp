// The sampled block sketch: finite differences of a fixed, seeded sample of each tensor.
//
// Each tensor is cut into blocks of `block_bytes` bytes (default 1024) (block b holds elements
// [b*B, (b+1)*B), B = block_bytes / element size, so a block starts on a cache line whenever
// the tensor's storage does). A fixed set of k of its N_b blocks, drawn without replacement
// from a seeded generator, is read every step: k = ceil(fraction * N_b), at least 1 and at
// least min_elements / B, at most N_b. The ring holds the last three values of the sampled elements only, so the state is
// O(sampled elements) and a step reads fraction * model size.
//
// The finite differences of a fixed sample are the sample of the finite differences, so
//   est(||d||^2) = (N_b / k) * sum over sampled blocks of sum_{i in block} d_i^2
// is the Horvitz-Thompson estimate of ||d||^2 for d = x, v, a, j: unbiased under simple random
// sampling of blocks, with variance N_b^2 (1 - k/N_b) S^2 / k (S^2: the variance of the block
// totals), and exact (variance 0) when k = N_b. docs/always-on.md states the bias of the ratio
// raw_jar and measures both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "zetaguard/kernels.hpp"
#include "zetaguard/tracker.hpp"

namespace zetaguard {

struct SamplerConfig {
    double fraction = 1.0 / 64.0;  // share of each tensor's blocks read, in (0, 1]
    std::size_t block_bytes = 1024;  // sixteen 64-byte cache lines
    std::uint64_t seed = 0x5eed;
    // At least this many elements per tensor (all of a smaller one): a block or two of a small
    // layer is too noisy an estimate, and reading a few thousand elements costs nothing.
    std::size_t min_elements = 4096;
    // At most about this many elements read per step over all tensors (0: no cap): past
    // max_elements / fraction parameters the fraction shrinks so that the sample, its ring and
    // the time a step takes stay the same whatever the model size (floors may add a little).
    std::size_t max_elements = 0;
};

struct SampleTensor {
    std::size_t numel = 0;
    DType dtype = DType::f32;
    std::size_t block = 0;                  // elements per block
    std::size_t total_blocks = 0;           // N_b
    std::vector<std::size_t> starts;        // first element of each sampled block, ascending
    std::size_t sampled = 0;                // elements read per step
    double scale = 1.0;                     // N_b / k
    // The sampled values as they were read, in the tensor's dtype (`sampled` elements each):
    // differences are taken in double, where the difference of two stored values is exact.
    std::vector<std::uint8_t> ring[3];
};

class Sampler {
public:
    // Throws std::invalid_argument for a fraction outside (0, 1] or a block under 8 bytes.
    explicit Sampler(SamplerConfig config);

    // Reads the sample of every tensor (same count, sizes and dtypes each step) and writes one
    // Channels per tensor: scaled estimates of x2, v2, a2, j2 and the non-finite count among
    // the sampled elements (not scaled). Throws StateError when the set of tensors changed.
    void update(const std::vector<TensorView>& tensors, std::vector<Channels>& out);

    // Estimated sum of squares and sampled non-finite count per tensor, no history
    // (gradients: the same blocks of tensors of the same shapes).
    void norms(const std::vector<TensorView>& tensors, std::vector<Channels>& out);

    int history() const noexcept { return history_; }
    const SamplerConfig& config() const noexcept { return config_; }
    // The fraction the plans use: config().fraction, or less under max_elements.
    double effective_fraction() const noexcept { return plan_config_.fraction; }
    const std::vector<SampleTensor>& tensors() const noexcept { return tensors_; }
    std::size_t tensor_count() const noexcept { return tensors_.size(); }
    std::size_t state_bytes() const noexcept;
    std::size_t sampled_elements() const noexcept;
    void reset() noexcept;
    int head() const noexcept { return head_; }

    // Take a saved ring back (a resumed guard): the plans are rebuilt from each tensor's numel
    // and dtype under this sampler's config, and every saved slot must hold exactly the plan's
    // sampled elements; history and head must be a state update() can reach. Throws
    // StateError otherwise, leaving the sampler as it was.
    void restore(const std::vector<std::size_t>& numels, const std::vector<DType>& dtypes,
                 std::vector<std::vector<std::uint8_t>> slots, int history, int head);

    // The block plan of one tensor: which blocks a tensor of `numel` elements of `dtype`
    // samples. Deterministic in (seed, index, numel, dtype, fraction, block_bytes).
    static SampleTensor plan(const SamplerConfig& config, std::size_t index, std::size_t numel,
                             DType dtype);

private:
    void initialise(const std::vector<TensorView>& tensors);
    void check_same_set(const std::vector<TensorView>& tensors) const;

    // config_ with the fraction capped for tensors of these sizes (max_elements).
    SamplerConfig capped(const std::vector<std::size_t>& numels) const noexcept;
    SamplerConfig config_;
    SamplerConfig plan_config_;  // what the plans use: capped by initialise() and restore()
    Isa isa_;  // the SIMD kernels' variant this CPU runs (kernels.hpp)
    std::vector<SampleTensor> tensors_;
    int history_ = 0;
    int head_ = -1;  // ring slot holding x[t-1]
};

}  // namespace zetaguard
