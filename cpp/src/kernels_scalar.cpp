// Portable kernels: L lanes emulated with plain doubles. Built without any SIMD target flags,
// they are the fallback on every CPU and the reference the SIMD variants are tested against.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "zetaguard/kernels.hpp"
#include "zetaguard/sketch_map.hpp"

namespace zetaguard {
namespace isa_scalar {
namespace {

template <int N>
struct Ops {
    static constexpr int L = N;
    struct V {
        double v[N];
    };
    static V zero() noexcept {
        V r;
        for (int l = 0; l < N; ++l) r.v[l] = 0.0;
        return r;
    }
    static V set1(double x) noexcept {
        V r;
        for (int l = 0; l < N; ++l) r.v[l] = x;
        return r;
    }
    template <class T>
    static V load(const T* p) noexcept {
        V r;
        for (int l = 0; l < N; ++l) r.v[l] = to_double(p[l]);
        return r;
    }
    static void store(double* p, const V& x) noexcept {
        for (int l = 0; l < N; ++l) p[l] = x.v[l];
    }
    static V add(const V& a, const V& b) noexcept {
        V r;
        for (int l = 0; l < N; ++l) r.v[l] = a.v[l] + b.v[l];
        return r;
    }
    static V sub(const V& a, const V& b) noexcept {
        V r;
        for (int l = 0; l < N; ++l) r.v[l] = a.v[l] - b.v[l];
        return r;
    }
    static V mul(const V& a, const V& b) noexcept {
        V r;
        for (int l = 0; l < N; ++l) r.v[l] = a.v[l] * b.v[l];
        return r;
    }
    static unsigned count_nonfinite(const V& x) noexcept {
        unsigned c = 0;
        for (int l = 0; l < N; ++l) {
            const double z = x.v[l] * 0.0;
            c += (z != z);
        }
        return c;
    }
};

#include "kernel_body.inl"

template <template <class> class Fn, class... Args>
void with_lanes(int lanes, Args&&... args) noexcept {
    switch (lanes) {
        case 1: Fn<Ops<1>>::run(args...); break;
        case 2: Fn<Ops<2>>::run(args...); break;
        case 4: Fn<Ops<4>>::run(args...); break;
        default: Fn<Ops<8>>::run(args...); break;
    }
}

template <class O>
struct Fused {
    template <class... A>
    static void run(A&&... a) noexcept { fused_dispatch<O>(a...); }
};
template <class O>
struct Norm {
    template <class... A>
    static void run(A&&... a) noexcept { norm_dispatch<O>(a...); }
};
template <class O>
struct SampledFused {
    template <class... A>
    static void run(A&&... a) noexcept { sampled_fused_dispatch<O>(a...); }
};
template <class O>
struct SampledNorm {
    template <class... A>
    static void run(A&&... a) noexcept { sampled_norm_dispatch<O>(a...); }
};
template <class O>
struct Sketch {
    template <class... A>
    static void run(A&&... a) noexcept { sketch_dispatch<O>(a...); }
};

}  // namespace

void fused(int lanes, DType dt, const void* cur, const void* s1, const void* s2, const void* s3,
           void* out, std::size_t n, LaneSums& acc) noexcept {
    with_lanes<Fused>(lanes, dt, cur, s1, s2, s3, out, n, acc);
}
void norm(int lanes, DType dt, const void* x, std::size_t n, LaneSums& acc) noexcept {
    with_lanes<Norm>(lanes, dt, x, n, acc);
}
void sampled_fused(int lanes, DType dt, const void* base, const BlockPlan& plan, const void* s1,
                   const void* s2, const void* s3, void* out, LaneSums& acc) noexcept {
    with_lanes<SampledFused>(lanes, dt, base, plan, s1, s2, s3, out, acc);
}
void sampled_norm(int lanes, DType dt, const void* base, const BlockPlan& plan,
                  LaneSums& acc) noexcept {
    with_lanes<SampledNorm>(lanes, dt, base, plan, acc);
}
void sketch(int lanes, DType dt, const void* x, std::size_t begin, std::size_t end,
            std::size_t k, const float* tau, std::uint64_t seed, double* buckets,
            LaneSums& acc) noexcept {
    with_lanes<Sketch>(lanes, dt, x, begin, end, k, tau, seed, buckets, acc);
}

}  // namespace isa_scalar
}  // namespace zetaguard
