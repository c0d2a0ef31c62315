// The engine's public face: finite differences of a set of tensors, step after step.
//
// A Tracker holds, per tensor, a ring of the last three snapshots (exact mode: in the tensor's
// own precision; sketch mode: three k-bucket sketches in double) and turns each new snapshot
// into ||x||^2, ||v||^2, ||a||^2, ||j||^2 and a non-finite count in one pass over the data:
//   v = x[t] - x[t-1],  a = v[t] - v[t-1],  j = a[t] - a[t-1].
// Differences are taken in double. For f32/f16/bf16 inputs the first difference of two nearby
// values is exact, so a tiny update on a large weight loses nothing to cancellation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "zetaguard/aligned.hpp"
#include "zetaguard/dtype.hpp"
#include "zetaguard/kernels.hpp"
#include "zetaguard/thread_pool.hpp"

namespace zetaguard {

struct TensorView {
    const void* data = nullptr;
    std::size_t numel = 0;
    DType dtype = DType::f32;
};

// Per-tensor squared norms of one step. A difference whose order exceeds the history held
// before the step is undefined: the caller reads `history` to know which fields are set.
struct Channels {
    double x2 = 0, v2 = 0, a2 = 0, j2 = 0;
    std::uint64_t nonfinite = 0;
};

enum class Mode : std::uint8_t { exact = 0, sketch = 1 };

struct TrackerConfig {
    Mode mode = Mode::exact;
    // Sketch mode: buckets shared by all tensors, split in proportion to size (at least
    // min_buckets each; a tensor less than 8 times its share is tracked exactly).
    std::size_t sketch_buckets = 16384;
    std::size_t min_buckets = 64;
    int threads = 1;
    std::uint64_t seed = 0x5eed;
    // Work below this many elements in one call stays on the calling thread: waking the pool
    // costs more than it saves.
    std::size_t parallel_threshold = std::size_t{1} << 18;
};

class StateError : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

// One tensor's ring. Public so the bindings can export and import it for save/load.
struct TensorState {
    std::size_t numel = 0;
    DType dtype = DType::f32;
    std::size_t buckets = 0;  // 0: exact ring in `dtype`; else a k-bucket sketch ring
    std::uint64_t seed = 0;
    std::vector<std::uint8_t> ring[3];   // exact mode: numel * dtype_size bytes each
    AlignedVector<double> sketch[3];     // sketch mode: `buckets` doubles each
    AlignedVector<float> tau;            // sketch mode: the per-position signs
    std::size_t state_bytes() const noexcept;
};

class Tracker {
public:
    explicit Tracker(TrackerConfig config);

    // Takes one snapshot of every tensor (same count, sizes and dtypes each step) and writes
    // one Channels per tensor into `out`. Throws StateError when the set of tensors changed.
    void update(const std::vector<TensorView>& tensors, std::vector<Channels>& out);

    // Sum of squares and non-finite count per tensor, with no history (gradients).
    void norms(const std::vector<TensorView>& tensors, std::vector<Channels>& out);

    // Snapshots held before the next update (0..3): v needs 1, a needs 2, j needs 3.
    int history() const noexcept { return history_; }
    int head() const noexcept { return head_; }
    const TrackerConfig& config() const noexcept { return config_; }
    Isa isa() const noexcept { return isa_; }
    std::size_t state_bytes() const noexcept;
    std::size_t tensor_count() const noexcept { return tensors_.size(); }

    void reset() noexcept;

    // Save/load support: the rings as they are, plus history and head.
    const std::vector<TensorState>& tensors() const noexcept { return tensors_; }
    void restore(std::vector<TensorState> tensors, int history, int head);

    // Bucket count a tensor of `numel` elements gets among tensors totalling `total` elements.
    static std::size_t buckets_for(std::size_t numel, std::size_t total,
                                   const TrackerConfig& config) noexcept;

private:
    struct WorkItem {
        std::size_t tensor, begin, end;
    };

    void initialise(const std::vector<TensorView>& tensors);
    void check_same_set(const std::vector<TensorView>& tensors) const;
    // Runs fn(0..n-1) inline for small work, else across the pool.
    void run_items(std::size_t n, std::size_t total_elements,
                   const std::function<void(std::size_t)>& fn);
    void exact_update(const std::vector<TensorView>& tensors, std::vector<Channels>& out);
    void sketch_update(const std::vector<TensorView>& tensors, std::vector<Channels>& out);
    int slot_written() const noexcept { return history_ < 3 ? history_ : (head_ + 1) % 3; }

    TrackerConfig config_;
    Isa isa_;
    int lanes_;
    std::vector<TensorState> tensors_;
    int history_ = 0;
    int head_ = -1;  // ring slot holding x[t-1]
    std::unique_ptr<ThreadPool> pool_;
};

}  // namespace zetaguard
