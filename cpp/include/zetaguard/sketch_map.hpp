// The fixed random linear map of sketch mode, shared by every ISA's kernel.
//
// Element p of chunk c (chunk = k consecutive elements) goes to bucket (p + offset_c) mod k
// with sign tau_p * rho_c. Signs make the estimate unbiased: E ||S v||^2 = ||v||^2 for any v,
// because two elements that share a bucket come from different chunks and so carry independent
// rho signs. The per-position tau and the per-chunk rotation keep structured vectors (constant,
// or repeating with period k) from aligning in the same buckets. Chunks are contiguous, so the
// kernel streams through memory instead of scattering element by element.
#pragma once

#include <cstddef>
#include <cstdint>

namespace zetaguard {

// The map's hash constants, one source for the engine and the device path (which reads them
// through _core.sketch_constants()): splitmix64's increment and multipliers, the multiplier
// of the per-position signs and the one of the per-chunk rotations and signs. The increment
// also steps the per-tensor seeds.
constexpr std::uint64_t kSplitmixGolden = 0x9e3779b97f4a7c15ULL;
constexpr std::uint64_t kSplitmixMul1 = 0xbf58476d1ce4e5b9ULL;
constexpr std::uint64_t kSplitmixMul2 = 0x94d049bb133111ebULL;
constexpr std::uint64_t kTauMul = 0xd1b54a32d192ed03ULL;
constexpr std::uint64_t kChunkMul = 0xa0761d6478bd642fULL;
// A tensor is sketched only when its buckets are at most 1/8 of its elements.
constexpr std::size_t kSketchMinCompression = 8;

inline std::uint64_t splitmix64(std::uint64_t x) noexcept {
    x += kSplitmixGolden;
    x = (x ^ (x >> 30)) * kSplitmixMul1;
    x = (x ^ (x >> 27)) * kSplitmixMul2;
    return x ^ (x >> 31);
}

struct ChunkMap {
    std::size_t offset;
    double sign;
};

// Rotations are whole multiples of 8 elements when k allows, so both segments of a chunk are
// whole SIMD vectors and no element takes the scalar tail (the engine rounds k up to 8s).
constexpr std::size_t kRotationGranule = 8;

inline ChunkMap chunk_map(std::uint64_t seed, std::size_t chunk, std::size_t k) noexcept {
    const std::uint64_t h = splitmix64(seed ^ (kChunkMul * (chunk + 1)));
    const std::size_t granule = k % kRotationGranule == 0 ? kRotationGranule : 1;
    return {granule * static_cast<std::size_t>((h >> 1) % (k / granule)), (h & 1u) ? -1.0 : 1.0};
}

// chunk_map() for one tensor, without a hardware division per chunk: with ~100-element chunks
// (a model of many tensors) two 64-bit divisions cost as much as the chunk's arithmetic.
// The modulo is Lemire's exact fastmod (one 128-bit reciprocal, a few multiplies), so the map
// is bit for bit chunk_map()'s (the device path and saved states depend on it).
class ChunkMapper {
public:
    ChunkMapper(std::uint64_t seed, std::size_t k) noexcept
        : seed_(seed),
          granule_(k % kRotationGranule == 0 ? kRotationGranule : 1),
          rotations_(k / granule_),
          reciprocal_(~static_cast<unsigned __int128>(0) / rotations_ + 1) {}

    ChunkMap operator()(std::size_t chunk) const noexcept {
        const std::uint64_t h = splitmix64(seed_ ^ (kChunkMul * (chunk + 1)));
        return {granule_ * static_cast<std::size_t>(fastmod(h >> 1)), (h & 1u) ? -1.0 : 1.0};
    }

private:
    // a % rotations_ for any 64-bit a (Lemire, Kaser, Kurz 2019, "Faster remainder by direct
    // computation"): the top 64 bits of (reciprocal * a mod 2^128) * rotations_.
    std::uint64_t fastmod(std::uint64_t a) const noexcept {
        const unsigned __int128 low = reciprocal_ * a;
        const unsigned __int128 bottom = (low & ~std::uint64_t{0}) * static_cast<unsigned __int128>(rotations_) >> 64;
        const unsigned __int128 top = (low >> 64) * static_cast<unsigned __int128>(rotations_);
        return static_cast<std::uint64_t>((bottom + top) >> 64);
    }

    std::uint64_t seed_;
    std::size_t granule_;
    std::uint64_t rotations_;
    unsigned __int128 reciprocal_;
};

}  // namespace zetaguard
