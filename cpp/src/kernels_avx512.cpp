// AVX-512F kernels: 8 double lanes. Compiled with -mavx512f -mavx2 -mf16c for this file only;
// the dispatcher calls them only after the CPU reports those features.
#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "zetaguard/kernels.hpp"
#include "zetaguard/sketch_map.hpp"

namespace zetaguard {
namespace isa_avx512 {
namespace {

struct Ops {
    static constexpr int L = 8;
    using V = __m512d;
    static V zero() noexcept { return _mm512_setzero_pd(); }
    static V set1(double x) noexcept { return _mm512_set1_pd(x); }
    static V load(const float* p) noexcept { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
    static V load(const double* p) noexcept { return _mm512_loadu_pd(p); }
    static V load(const f16_t* p) noexcept {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm512_cvtps_pd(_mm256_cvtph_ps(h));
    }
    static V load(const bf16_t* p) noexcept {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        return _mm512_cvtps_pd(_mm256_castsi256_ps(w));
    }
    static void store(double* p, V x) noexcept { _mm512_storeu_pd(p, x); }
    static V add(V a, V b) noexcept { return _mm512_add_pd(a, b); }
    static V sub(V a, V b) noexcept { return _mm512_sub_pd(a, b); }
    static V mul(V a, V b) noexcept { return _mm512_mul_pd(a, b); }
    static unsigned count_nonfinite(V x) noexcept {
        const V z = _mm512_mul_pd(x, _mm512_setzero_pd());
        return static_cast<unsigned>(__builtin_popcount(_mm512_cmp_pd_mask(z, z, _CMP_UNORD_Q)));
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

}  // namespace isa_avx512
}  // namespace zetaguard
