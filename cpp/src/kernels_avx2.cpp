// AVX2 + F16C kernels: 4 double lanes. Compiled with -mavx2 -mf16c for this file only; the
// dispatcher calls them only after the CPU reports both features.
#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "zetaguard/kernels.hpp"
#include "zetaguard/sketch_map.hpp"

namespace zetaguard {
namespace isa_avx2 {
namespace {

struct Ops {
    static constexpr int L = 4;
    using V = __m256d;
    static V zero() noexcept { return _mm256_setzero_pd(); }
    static V set1(double x) noexcept { return _mm256_set1_pd(x); }
    static V load(const float* p) noexcept { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
    static V load(const double* p) noexcept { return _mm256_loadu_pd(p); }
    static V load(const f16_t* p) noexcept {
        const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        return _mm256_cvtps_pd(_mm_cvtph_ps(h));
    }
    static V load(const bf16_t* p) noexcept {
        const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        const __m128i w = _mm_slli_epi32(_mm_cvtepu16_epi32(h), 16);
        return _mm256_cvtps_pd(_mm_castsi128_ps(w));
    }
    static void store(double* p, V x) noexcept { _mm256_storeu_pd(p, x); }
    static V add(V a, V b) noexcept { return _mm256_add_pd(a, b); }
    static V sub(V a, V b) noexcept { return _mm256_sub_pd(a, b); }
    static V mul(V a, V b) noexcept { return _mm256_mul_pd(a, b); }
    static unsigned count_nonfinite(V x) noexcept {
        const V z = _mm256_mul_pd(x, _mm256_setzero_pd());
        return static_cast<unsigned>(
            __builtin_popcount(_mm256_movemask_pd(_mm256_cmp_pd(z, z, _CMP_UNORD_Q))));
    }
};

#include "kernel_body.inl"

}  // namespace

void fused(DType dt, const void* cur, const void* s1, const void* s2, const void* s3, void* out,
           std::size_t n, LaneSums& acc) noexcept {
    fused_dispatch<Ops>(dt, cur, s1, s2, s3, out, n, acc);
}
void norm(DType dt, const void* x, std::size_t n, LaneSums& acc) noexcept {
    norm_dispatch<Ops>(dt, x, n, acc);
}
void sampled_fused(DType dt, const void* base, const BlockPlan& plan, const void* s1,
                   const void* s2, const void* s3, void* out, LaneSums& acc) noexcept {
    sampled_fused_dispatch<Ops>(dt, base, plan, s1, s2, s3, out, acc);
}
void sampled_norm(DType dt, const void* base, const BlockPlan& plan, LaneSums& acc) noexcept {
    sampled_norm_dispatch<Ops>(dt, base, plan, acc);
}
void sketch(DType dt, const void* x, std::size_t begin, std::size_t end, std::size_t k,
            const float* tau, std::uint64_t seed, double* buckets, LaneSums& acc) noexcept {
    sketch_dispatch<Ops>(dt, x, begin, end, k, tau, seed, buckets, acc);
}

}  // namespace isa_avx2
}  // namespace zetaguard
