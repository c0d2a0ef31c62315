// Run-time ISA selection. Nothing in the shipped library assumes more than baseline x86-64:
// the SIMD variants are only reached after CPUID says they are safe.
#include <cstdlib>
#include <initializer_list>
#include <cstring>

#include "zetaguard/kernels.hpp"

namespace zetaguard {

namespace isa_scalar {
void fused(int, DType, const void*, const void*, const void*, const void*, void*, std::size_t,
           LaneSums&) noexcept;
void norm(int, DType, const void*, std::size_t, LaneSums&) noexcept;
void sampled_fused(int, DType, const void*, const BlockPlan&, const void*, const void*,
                   const void*, void*, LaneSums&) noexcept;
void sampled_norm(int, DType, const void*, const BlockPlan&, LaneSums&) noexcept;
void sketch(int, DType, const void*, std::size_t, std::size_t, std::size_t, const float*,
            std::uint64_t, double*, LaneSums&) noexcept;
}  // namespace isa_scalar

#if defined(ZETAGUARD_HAVE_X86_SIMD)
#define ZG_DECLARE_ISA(ns)                                                                    \
    namespace ns {                                                                            \
    void fused(DType, const void*, const void*, const void*, const void*, void*, std::size_t, \
               LaneSums&) noexcept;                                                           \
    void norm(DType, const void*, std::size_t, LaneSums&) noexcept;                           \
    void sampled_fused(DType, const void*, const BlockPlan&, const void*, const void*,        \
                       const void*, void*, LaneSums&) noexcept;                               \
    void sampled_norm(DType, const void*, const BlockPlan&, LaneSums&) noexcept;              \
    void sketch(DType, const void*, std::size_t, std::size_t, std::size_t, const float*,      \
                std::uint64_t, double*, LaneSums&) noexcept;                                  \
    }
ZG_DECLARE_ISA(isa_avx2)
ZG_DECLARE_ISA(isa_avx512)
#undef ZG_DECLARE_ISA
#endif

const char* dtype_name(DType t) noexcept {
    switch (t) {
        case DType::f32: return "float32";
        case DType::f64: return "float64";
        case DType::f16: return "float16";
        case DType::bf16: return "bfloat16";
    }
    return "unknown";
}

const char* isa_name(Isa isa) noexcept {
    switch (isa) {
        case Isa::scalar: return "scalar";
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
    }
    return "unknown";
}

bool isa_supported(Isa isa) noexcept {
    switch (isa) {
        case Isa::scalar: return true;
#if defined(ZETAGUARD_HAVE_X86_SIMD)
        case Isa::avx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
        case Isa::avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("f16c");
#else
        default: return false;
#endif
    }
    return false;
}

Isa best_isa() noexcept {
    // An override for benchmarks and for reproducing a user's machine; unknown values and
    // unsupported requests fall back to detection rather than crash.
    if (const char* forced = std::getenv("ZETAGUARD_ISA")) {
        for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
            if (std::strcmp(forced, isa_name(isa)) == 0 && isa_supported(isa)) return isa;
        }
    }
    if (isa_supported(Isa::avx512)) return Isa::avx512;
    if (isa_supported(Isa::avx2)) return Isa::avx2;
    return Isa::scalar;
}

void fused_pass(Isa isa, int lanes, DType dt, const void* cur, const void* s1, const void* s2,
                const void* s3, void* out, std::size_t n, LaneSums& acc) noexcept {
#if defined(ZETAGUARD_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return isa_avx512::fused(dt, cur, s1, s2, s3, out, n, acc);
    if (isa == Isa::avx2) return isa_avx2::fused(dt, cur, s1, s2, s3, out, n, acc);
#endif
    (void)isa;
    isa_scalar::fused(lanes, dt, cur, s1, s2, s3, out, n, acc);
}

void norm_pass(Isa isa, int lanes, DType dt, const void* x, std::size_t n,
               LaneSums& acc) noexcept {
#if defined(ZETAGUARD_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return isa_avx512::norm(dt, x, n, acc);
    if (isa == Isa::avx2) return isa_avx2::norm(dt, x, n, acc);
#endif
    (void)isa;
    isa_scalar::norm(lanes, dt, x, n, acc);
}

void sampled_fused_pass(Isa isa, int lanes, DType dt, const void* base, const BlockPlan& plan,
                        const void* s1, const void* s2, const void* s3, void* out,
                        LaneSums& acc) noexcept {
#if defined(ZETAGUARD_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return isa_avx512::sampled_fused(dt, base, plan, s1, s2, s3, out, acc);
    if (isa == Isa::avx2) return isa_avx2::sampled_fused(dt, base, plan, s1, s2, s3, out, acc);
#endif
    (void)isa;
    isa_scalar::sampled_fused(lanes, dt, base, plan, s1, s2, s3, out, acc);
}

void sampled_norm_pass(Isa isa, int lanes, DType dt, const void* base, const BlockPlan& plan,
                       LaneSums& acc) noexcept {
#if defined(ZETAGUARD_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return isa_avx512::sampled_norm(dt, base, plan, acc);
    if (isa == Isa::avx2) return isa_avx2::sampled_norm(dt, base, plan, acc);
#endif
    (void)isa;
    isa_scalar::sampled_norm(lanes, dt, base, plan, acc);
}

void sketch_pass(Isa isa, int lanes, DType dt, const void* x, std::size_t begin, std::size_t end,
                 std::size_t k, const float* tau, std::uint64_t seed, double* buckets,
                 LaneSums& acc) noexcept {
#if defined(ZETAGUARD_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return isa_avx512::sketch(dt, x, begin, end, k, tau, seed, buckets, acc);
    if (isa == Isa::avx2) return isa_avx2::sketch(dt, x, begin, end, k, tau, seed, buckets, acc);
#endif
    (void)isa;
    isa_scalar::sketch(lanes, dt, x, begin, end, k, tau, seed, buckets, acc);
}

}  // namespace zetaguard
