// The per-ISA kernels behind the engine. Each ISA lives in its own translation unit compiled
// with its own target flags; the dispatcher only calls a variant the running CPU supports.
#pragma once

#include <cstddef>
#include <cstdint>

#include "zetaguard/dtype.hpp"

namespace zetaguard {

enum class Isa : std::uint8_t { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa) noexcept;
bool isa_supported(Isa isa) noexcept;  // compiled in AND supported by this CPU
Isa best_isa() noexcept;               // honours ZETAGUARD_ISA=scalar|avx2|avx512 when set

constexpr int kMaxLanes = 8;

// Partial sums kept per SIMD lane: element i of a call lands in lane i % lanes. The scalar
// kernels emulate the same lanes, so every ISA gives bit-identical lanes for the same input.
struct LaneSums {
    int lanes = 0;
    double x2[kMaxLanes] = {};  // sum x^2 of the current snapshot
    double v2[kMaxLanes] = {};  // sum (x0 - x1)^2
    double a2[kMaxLanes] = {};  // sum (x0 - 2 x1 + x2)^2
    double j2[kMaxLanes] = {};  // sum (x0 - 3 x1 + 3 x2 - x3)^2
    std::uint64_t nonfinite = 0;  // NaN or +-Inf elements of the current snapshot
};

// One fused pass with three snapshots of history: reads cur, s1 = x[t-1], s2 = x[t-2],
// s3 = x[t-3]; writes cur into `out` (which may be s3: each element is read before written).
void fused_pass(Isa isa, int lanes, DType dt, const void* cur, const void* s1, const void* s2,
                const void* s3, void* out, std::size_t n, LaneSums& acc) noexcept;

// Sum of squares and non-finite count only (gradients; snapshots without enough history).
void norm_pass(Isa isa, int lanes, DType dt, const void* x, std::size_t n, LaneSums& acc) noexcept;

// The blocks of one tensor a sampled pass reads (sampler.hpp): `count` ascending element
// offsets `starts`, each the first of a block of `block` elements (the last one cut at numel).
struct BlockPlan {
    const std::size_t* starts = nullptr;
    std::size_t count = 0;
    std::size_t block = 0;
    std::size_t numel = 0;
};

// fused_pass over a plan's blocks: cur is the tensor's base; s1, s2, s3 and out hold the
// sampled elements only, block after block (out may be s3).
void sampled_fused_pass(Isa isa, int lanes, DType dt, const void* base, const BlockPlan& plan,
                        const void* s1, const void* s2, const void* s3, void* out,
                        LaneSums& acc) noexcept;

// norm_pass over a plan's blocks.
void sampled_norm_pass(Isa isa, int lanes, DType dt, const void* base, const BlockPlan& plan,
                       LaneSums& acc) noexcept;

// Linear signed sketch of x[begin, end) into k buckets (see sketch.hpp for the map), added to
// `buckets`; also sum x^2 and the non-finite count into acc. begin is a multiple of k.
void sketch_pass(Isa isa, int lanes, DType dt, const void* x, std::size_t begin, std::size_t end,
                 std::size_t k, const float* tau, std::uint64_t seed, double* buckets,
                 LaneSums& acc) noexcept;

// Lane count each ISA uses natively (the scalar kernels accept any 1..kMaxLanes).
constexpr int native_lanes(Isa isa) noexcept { return isa == Isa::avx512 ? 8 : 4; }

}  // namespace zetaguard
