// Kernel bodies shared by every ISA. Included inside a per-ISA namespace of a translation unit
// that defines `Ops` (a SIMD vector of doubles: L lanes, loads that widen each input type to
// double, add/sub/mul, store, count_nonfinite). Nothing here may have external linkage: each
// TU is compiled with different target flags and the linker must never mix their copies.
//
// Arithmetic order is fixed and identical for vector body and scalar tail, and the engine is
// built with -ffp-contract=off, so an ISA's lanes equal the scalar emulation bit for bit.

template <class Ops>
inline void store_lanes(const typename Ops::V& v, double* out) noexcept {
    Ops::store(out, v);
}

template <class Ops>
inline void flush(const double* lx2, const double* lv2, const double* la2, const double* lj2,
                  std::uint64_t nf, LaneSums& acc) noexcept {
    acc.lanes = Ops::L;
    for (int l = 0; l < Ops::L; ++l) {
        acc.x2[l] += lx2[l];
        acc.v2[l] += lv2[l];
        acc.a2[l] += la2[l];
        acc.j2[l] += lj2[l];
    }
    acc.nonfinite += nf;
}

// A prefetch hint kPrefetchBytes past p. The address is formed as an integer: past the end of
// the buffer it is never dereferenced (a prefetch cannot fault), and no out-of-range pointer
// is ever made.
inline constexpr std::uintptr_t kPrefetchBytes = 2048;
template <class T>
inline void prefetch_ahead(const T* p, int for_write) noexcept {
    const auto* ahead =
        reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + kPrefetchBytes);
    if (for_write) {
        __builtin_prefetch(ahead, 1);
    } else {
        __builtin_prefetch(ahead, 0);
    }
}

inline bool scalar_nonfinite(double x) noexcept {
    const double z = x * 0.0;  // 0 for finite x, NaN for NaN and +-Inf
    return z != z;
}

// The non-finite count of x[0, n), given the lane sums of x^2 over the same values. A NaN or an
// infinity makes its lane's sum non-finite (squares are never negative, so nothing cancels),
// so finite sums prove the count is 0: the norm and sketch loops skip a compare-and-count per
// vector and only a tensor that has non-finite values (or squares past 1e308) is scanned again.
template <class T>
std::uint64_t count_if_nonfinite(const T* x, std::size_t n, const double* lane_x2,
                                 int lanes) noexcept {
    bool finite = true;
    for (int l = 0; l < lanes; ++l) finite = finite && std::isfinite(lane_x2[l]);
    if (finite) return 0;
    std::uint64_t nf = 0;
    for (std::size_t i = 0; i < n; ++i) nf += scalar_nonfinite(to_double(x[i]));
    return nf;
}

// One vector of the fused pass: x0 = cur, x1..x3 = the ring's last three snapshots; cur goes to
// out (which may be s3: loaded before written). Shared by fused_body and sampled_fused_body so
// the arithmetic order, and so every result bit, is the same in both.
template <class Ops, class T>
__attribute__((always_inline)) inline typename Ops::V fused_vector(
    const T* cur, const T* s1, const T* s2, const T* s3, T* out, typename Ops::V& x2,
    typename Ops::V& v2, typename Ops::V& a2, typename Ops::V& j2) noexcept {
    using V = typename Ops::V;
    const V x0 = Ops::load(cur);
    const V x1 = Ops::load(s1);
    const V y2 = Ops::load(s2);
    const V x3 = Ops::load(s3);
    __builtin_memcpy(out, cur, sizeof(T) * Ops::L);
    const V d1 = Ops::sub(x0, x1);
    const V d2 = Ops::sub(x1, y2);
    const V d3 = Ops::sub(y2, x3);
    const V a = Ops::sub(d1, d2);
    const V j = Ops::sub(a, Ops::sub(d2, d3));
    x2 = Ops::add(x2, Ops::mul(x0, x0));
    v2 = Ops::add(v2, Ops::mul(d1, d1));
    a2 = Ops::add(a2, Ops::mul(a, a));
    j2 = Ops::add(j2, Ops::mul(j, j));
    return x0;
}

// The same for one element (a tail shorter than a vector) into lane sums; returns x0.
template <class T>
inline double fused_element(const T* cur, const T* s1, const T* s2, const T* s3, T* out,
                            double& x2, double& v2, double& a2, double& j2) noexcept {
    const double x0 = to_double(*cur);
    const double x1 = to_double(*s1);
    const double y2 = to_double(*s2);
    const double x3 = to_double(*s3);
    *out = *cur;
    const double d1 = x0 - x1;
    const double d2 = x1 - y2;
    const double d3 = y2 - x3;
    const double a = d1 - d2;
    const double j = a - (d2 - d3);
    x2 = x2 + x0 * x0;
    v2 = v2 + d1 * d1;
    a2 = a2 + a * a;
    j2 = j2 + j * j;
    return x0;
}

template <class Ops, class T>
void fused_body(const T* cur, const T* s1, const T* s2, const T* s3, T* out, std::size_t n,
                LaneSums& acc) noexcept {
    using V = typename Ops::V;
    constexpr int L = Ops::L;
    V x2 = Ops::zero(), v2 = Ops::zero(), a2 = Ops::zero(), j2 = Ops::zero();
    std::uint64_t nf = 0;
    std::size_t i = 0;
    // Four input streams outrun what the hardware prefetcher keeps in flight for one core:
    // ask for each stream's line a few KiB ahead (~25% faster single-threaded at 25M).
    for (; i + L <= n; i += L) {
        prefetch_ahead(cur + i, 0);
        prefetch_ahead(s1 + i, 0);
        prefetch_ahead(s2 + i, 0);
        prefetch_ahead(s3 + i, 1);
        const V x0 =
            fused_vector<Ops>(cur + i, s1 + i, s2 + i, s3 + i, out + i, x2, v2, a2, j2);
        nf += Ops::count_nonfinite(x0);
    }
    double lx2[L], lv2[L], la2[L], lj2[L];
    store_lanes<Ops>(x2, lx2);
    store_lanes<Ops>(v2, lv2);
    store_lanes<Ops>(a2, la2);
    store_lanes<Ops>(j2, lj2);
    for (; i < n; ++i) {
        const int l = static_cast<int>(i % L);
        nf += scalar_nonfinite(fused_element(cur + i, s1 + i, s2 + i, s3 + i, out + i, lx2[l],
                                             lv2[l], la2[l], lj2[l]));
    }
    flush<Ops>(lx2, lv2, la2, lj2, nf, acc);
}

template <class Ops, class T>
void norm_body(const T* x, std::size_t n, LaneSums& acc) noexcept {
    using V = typename Ops::V;
    constexpr int L = Ops::L;
    V x2 = Ops::zero();
    std::size_t i = 0;
    for (; i + L <= n; i += L) {
        const V x0 = Ops::load(x + i);
        x2 = Ops::add(x2, Ops::mul(x0, x0));
    }
    double lx2[L], zero[L] = {};
    store_lanes<Ops>(x2, lx2);
    for (; i < n; ++i) {
        const int l = static_cast<int>(i % L);
        const double x0 = to_double(x[i]);
        lx2[l] = lx2[l] + x0 * x0;
    }
    flush<Ops>(lx2, zero, zero, zero, count_if_nonfinite(x, n, lx2, L), acc);
}

// One whole SIMD vector of the sketch: dst[0, L) += sign * tau[0, L) * x[0, L); x^2 into acc.
template <class Ops, class T>
__attribute__((always_inline)) inline void sketch_vector(const T* x, const float* tau,
                                                         const typename Ops::V& sign, double* dst,
                                                         typename Ops::V& acc) noexcept {
    const auto xv = Ops::load(x);
    const auto tv = Ops::load(tau);
    Ops::store(dst, Ops::add(Ops::load(static_cast<const double*>(dst)),
                             Ops::mul(Ops::mul(tv, xv), sign)));
    acc = Ops::add(acc, Ops::mul(xv, xv));
}

// The same for one element (a tail shorter than a vector), in the same arithmetic order.
template <class T>
inline void sketch_element(T x, float tau, double sign, double& dst, double& tail_x2) noexcept {
    const double xv = to_double(x);
    dst = dst + (static_cast<double>(tau) * xv) * sign;
    tail_x2 = tail_x2 + xv * xv;
}

// buckets[p + shift] += sign * tau[p] * x[p] for p in [p0, p1). The x^2 and non-finite
// accumulators run across every segment of a call and are flushed once by sketch_body: with
// many small tensors a chunk is only ~100 elements, and a flush per segment would cost more
// than the segment itself.
// Inlined into the chunk loop: a call per segment (two per ~100-element chunk on a model of
// many tensors) is overhead the segment's own arithmetic cannot hide.
template <class Ops, class T>
__attribute__((always_inline)) inline void sketch_segment(const T* x, const float* tau, double sign, double* buckets,
                    std::ptrdiff_t shift, std::size_t p0, std::size_t p1, typename Ops::V& x2,
                    double& tail_x2) noexcept {
    using V = typename Ops::V;
    constexpr int L = Ops::L;
    const V s = Ops::set1(sign);
    // Local copies of the accumulators: through the references the compiler must assume the
    // bucket stores may alias them and round-trips them through memory every vector, a
    // store-to-load chain that made the loop ~2x slower than the arithmetic.
    V acc = x2;
    double tail = tail_x2;
    std::size_t p = p0;
    for (; p + L <= p1; p += L)
        sketch_vector<Ops>(x + p, tau + p, s, buckets + (static_cast<std::ptrdiff_t>(p) + shift), acc);
    for (; p < p1; ++p)
        sketch_element(x[p], tau[p], sign, buckets[static_cast<std::ptrdiff_t>(p) + shift], tail);
    x2 = acc;
    tail_x2 = tail;
}

// One chunk whose rotation is a whole number of SIMD vectors (k and the offset multiples of
// kRotationGranule): one loop of a fixed trip count with the wrap-around done by a select, not
// two loops whose lengths change with every chunk's random offset (a mispredicted loop exit
// each, the dominant cost with ~100-element chunks). Same elements, same lanes, same order as
// sketch_segment() over the two halves, so the result is bit for bit the same.
template <class Ops, class T>
__attribute__((always_inline)) inline void sketch_rotated_chunk(
    const T* x, const float* tau, double sign, double* buckets, std::size_t offset,
    std::size_t k, std::size_t len, typename Ops::V& x2, double& tail_x2) noexcept {
    using V = typename Ops::V;
    constexpr int L = Ops::L;
    const V s = Ops::set1(sign);
    V acc = x2;  // locals: see sketch_segment()
    double tail = tail_x2;
    const std::size_t vec_end = len - len % L;
    std::size_t p = 0;
    for (; p < vec_end; p += L) {
        const std::size_t b = p + offset;
        sketch_vector<Ops>(x + p, tau + p, s, buckets + (b >= k ? b - k : b), acc);
    }
    for (; p < len; ++p) {
        const std::size_t b = p + offset;
        sketch_element(x[p], tau[p], sign, buckets[b >= k ? b - k : b], tail);
    }
    x2 = acc;
    tail_x2 = tail;
}

template <class Ops, class T>
void sketch_body(const T* x, std::size_t begin, std::size_t end, std::size_t k, const float* tau,
                 std::uint64_t seed, double* buckets, LaneSums& acc) noexcept {
    constexpr int L = Ops::L;
    typename Ops::V x2 = Ops::zero();
    double tail_x2 = 0.0;
    const ChunkMapper map(seed, k);
    const bool whole_vectors = k % kRotationGranule == 0 && kRotationGranule % L == 0;
    std::size_t chunk = begin / k;  // callers start on a chunk boundary
    for (std::size_t start = begin; start < end; start += k, ++chunk) {
        const std::size_t len = (end - start < k) ? end - start : k;
        const ChunkMap m = map(chunk);
        const T* xs = x + start;
        if (whole_vectors) {
            sketch_rotated_chunk<Ops>(xs, tau, m.sign, buckets, m.offset, k, len, x2, tail_x2);
            continue;
        }
        const std::size_t wrap = k - m.offset;  // first position that wraps to bucket 0
        const std::size_t first_end = len < wrap ? len : wrap;
        sketch_segment<Ops>(xs, tau, m.sign, buckets, static_cast<std::ptrdiff_t>(m.offset), 0,
                            first_end, x2, tail_x2);
        if (len > wrap) {
            sketch_segment<Ops>(xs, tau, m.sign, buckets, -static_cast<std::ptrdiff_t>(wrap), wrap,
                                len, x2, tail_x2);
        }
    }
    double lx2[L], zero[L] = {};
    store_lanes<Ops>(x2, lx2);
    lx2[0] = lx2[0] + tail_x2;
    flush<Ops>(lx2, zero, zero, zero, count_if_nonfinite(x + begin, end - begin, lx2, L), acc);
}

// ---- the sampled block sketch (sampler.hpp) -------------------------------------------
// The same arithmetic as fused_body and norm_body over a plan's scattered blocks. Blocks are
// too short for the streams' prefetch distance, so the block kBlocksAhead places on is asked
// for line by line instead (the ring slots are contiguous and keep the per-stream prefetch),
// and the lanes run on across blocks: one flush per tensor.
inline constexpr std::size_t kBlocksAhead = 4;

// Elements in block b (the tensor's last block may be cut short).
inline std::size_t block_length(const BlockPlan& plan, std::size_t b) noexcept {
    const std::size_t start = plan.starts[b];
    return plan.numel - start < plan.block ? plan.numel - start : plan.block;
}

template <class T>
inline void prefetch_block(const T* base, const BlockPlan& plan, std::size_t b) noexcept {
    const char* p = reinterpret_cast<const char*>(base + plan.starts[b]);
    const std::size_t bytes = block_length(plan, b) * sizeof(T);
    for (std::size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
}

// Non-finite elements of the sampled blocks, counted only when a lane's sum of squares says
// there are any (as count_if_nonfinite).
template <class T>
std::uint64_t sampled_nonfinite(const T* base, const BlockPlan& plan, const double* lane_x2,
                                int lanes) noexcept {
    bool finite = true;
    for (int l = 0; l < lanes; ++l) finite = finite && std::isfinite(lane_x2[l]);
    if (finite) return 0;
    std::uint64_t nf = 0;
    for (std::size_t b = 0; b < plan.count; ++b) {
        const T* x = base + plan.starts[b];
        const std::size_t n = block_length(plan, b);
        for (std::size_t i = 0; i < n; ++i) nf += scalar_nonfinite(to_double(x[i]));
    }
    return nf;
}

template <class Ops, class T>
void sampled_fused_body(const T* base, const BlockPlan& plan, const T* s1, const T* s2,
                        const T* s3, T* out, LaneSums& acc) noexcept {
    using V = typename Ops::V;
    constexpr int L = Ops::L;
    V x2 = Ops::zero(), v2 = Ops::zero(), a2 = Ops::zero(), j2 = Ops::zero();
    double tx2[L] = {}, tv2[L] = {}, ta2[L] = {}, tj2[L] = {};  // the blocks' short tails
    std::size_t q = 0;  // position in the ring slots
    for (std::size_t b = 0; b < plan.count; ++b) {
        if (b + kBlocksAhead < plan.count) prefetch_block(base, plan, b + kBlocksAhead);
        const T* cur = base + plan.starts[b];
        const std::size_t n = block_length(plan, b);
        std::size_t i = 0;
        for (; i + L <= n; i += L, q += L) {
            prefetch_ahead(s1 + q, 0);
            prefetch_ahead(s2 + q, 0);
            prefetch_ahead(s3 + q, 1);
            fused_vector<Ops>(cur + i, s1 + q, s2 + q, s3 + q, out + q, x2, v2, a2, j2);
        }
        for (int l = 0; i < n; ++i, ++q, ++l)
            fused_element(cur + i, s1 + q, s2 + q, s3 + q, out + q, tx2[l], tv2[l], ta2[l],
                          tj2[l]);
    }
    double lx2[L], lv2[L], la2[L], lj2[L];
    store_lanes<Ops>(x2, lx2);
    store_lanes<Ops>(v2, lv2);
    store_lanes<Ops>(a2, la2);
    store_lanes<Ops>(j2, lj2);
    for (int l = 0; l < L; ++l) {
        lx2[l] = lx2[l] + tx2[l];
        lv2[l] = lv2[l] + tv2[l];
        la2[l] = la2[l] + ta2[l];
        lj2[l] = lj2[l] + tj2[l];
    }
    flush<Ops>(lx2, lv2, la2, lj2, sampled_nonfinite(base, plan, lx2, L), acc);
}

template <class Ops, class T>
void sampled_norm_body(const T* base, const BlockPlan& plan, LaneSums& acc) noexcept {
    using V = typename Ops::V;
    constexpr int L = Ops::L;
    V x2 = Ops::zero();
    double tx2[L] = {};
    for (std::size_t b = 0; b < plan.count; ++b) {
        if (b + kBlocksAhead < plan.count) prefetch_block(base, plan, b + kBlocksAhead);
        const T* x = base + plan.starts[b];
        const std::size_t n = block_length(plan, b);
        std::size_t i = 0;
        for (; i + L <= n; i += L) {
            const V x0 = Ops::load(x + i);
            x2 = Ops::add(x2, Ops::mul(x0, x0));
        }
        for (int l = 0; i < n; ++i, ++l) {
            const double x0 = to_double(x[i]);
            tx2[l] = tx2[l] + x0 * x0;
        }
    }
    double lx2[L], zero[L] = {};
    store_lanes<Ops>(x2, lx2);
    for (int l = 0; l < L; ++l) lx2[l] = lx2[l] + tx2[l];
    flush<Ops>(lx2, zero, zero, zero, sampled_nonfinite(base, plan, lx2, L), acc);
}

template <class Ops>
void sampled_fused_dispatch(DType dt, const void* base, const BlockPlan& plan, const void* s1,
                            const void* s2, const void* s3, void* out, LaneSums& acc) noexcept {
    switch (dt) {
        case DType::f32:
            sampled_fused_body<Ops>(static_cast<const float*>(base), plan,
                                    static_cast<const float*>(s1), static_cast<const float*>(s2),
                                    static_cast<const float*>(s3), static_cast<float*>(out), acc);
            break;
        case DType::f64:
            sampled_fused_body<Ops>(static_cast<const double*>(base), plan,
                                    static_cast<const double*>(s1),
                                    static_cast<const double*>(s2),
                                    static_cast<const double*>(s3), static_cast<double*>(out), acc);
            break;
        case DType::f16:
            sampled_fused_body<Ops>(static_cast<const f16_t*>(base), plan,
                                    static_cast<const f16_t*>(s1), static_cast<const f16_t*>(s2),
                                    static_cast<const f16_t*>(s3), static_cast<f16_t*>(out), acc);
            break;
        case DType::bf16:
            sampled_fused_body<Ops>(static_cast<const bf16_t*>(base), plan,
                                    static_cast<const bf16_t*>(s1),
                                    static_cast<const bf16_t*>(s2),
                                    static_cast<const bf16_t*>(s3), static_cast<bf16_t*>(out), acc);
            break;
    }
}

template <class Ops>
void sampled_norm_dispatch(DType dt, const void* base, const BlockPlan& plan,
                           LaneSums& acc) noexcept {
    switch (dt) {
        case DType::f32: sampled_norm_body<Ops>(static_cast<const float*>(base), plan, acc); break;
        case DType::f64: sampled_norm_body<Ops>(static_cast<const double*>(base), plan, acc); break;
        case DType::f16: sampled_norm_body<Ops>(static_cast<const f16_t*>(base), plan, acc); break;
        case DType::bf16:
            sampled_norm_body<Ops>(static_cast<const bf16_t*>(base), plan, acc);
            break;
    }
}

template <class Ops>
void fused_dispatch(DType dt, const void* cur, const void* s1, const void* s2, const void* s3,
                    void* out, std::size_t n, LaneSums& acc) noexcept {
    switch (dt) {
        case DType::f32:
            fused_body<Ops>(static_cast<const float*>(cur), static_cast<const float*>(s1),
                            static_cast<const float*>(s2), static_cast<const float*>(s3),
                            static_cast<float*>(out), n, acc);
            break;
        case DType::f64:
            fused_body<Ops>(static_cast<const double*>(cur), static_cast<const double*>(s1),
                            static_cast<const double*>(s2), static_cast<const double*>(s3),
                            static_cast<double*>(out), n, acc);
            break;
        case DType::f16:
            fused_body<Ops>(static_cast<const f16_t*>(cur), static_cast<const f16_t*>(s1),
                            static_cast<const f16_t*>(s2), static_cast<const f16_t*>(s3),
                            static_cast<f16_t*>(out), n, acc);
            break;
        case DType::bf16:
            fused_body<Ops>(static_cast<const bf16_t*>(cur), static_cast<const bf16_t*>(s1),
                            static_cast<const bf16_t*>(s2), static_cast<const bf16_t*>(s3),
                            static_cast<bf16_t*>(out), n, acc);
            break;
    }
}

template <class Ops>
void norm_dispatch(DType dt, const void* x, std::size_t n, LaneSums& acc) noexcept {
    switch (dt) {
        case DType::f32: norm_body<Ops>(static_cast<const float*>(x), n, acc); break;
        case DType::f64: norm_body<Ops>(static_cast<const double*>(x), n, acc); break;
        case DType::f16: norm_body<Ops>(static_cast<const f16_t*>(x), n, acc); break;
        case DType::bf16: norm_body<Ops>(static_cast<const bf16_t*>(x), n, acc); break;
    }
}

template <class Ops>
void sketch_dispatch(DType dt, const void* x, std::size_t begin, std::size_t end, std::size_t k,
                     const float* tau, std::uint64_t seed, double* buckets,
                     LaneSums& acc) noexcept {
    switch (dt) {
        case DType::f32:
            sketch_body<Ops>(static_cast<const float*>(x), begin, end, k, tau, seed, buckets, acc);
            break;
        case DType::f64:
            sketch_body<Ops>(static_cast<const double*>(x), begin, end, k, tau, seed, buckets, acc);
            break;
        case DType::f16:
            sketch_body<Ops>(static_cast<const f16_t*>(x), begin, end, k, tau, seed, buckets, acc);
            break;
        case DType::bf16:
            sketch_body<Ops>(static_cast<const bf16_t*>(x), begin, end, k, tau, seed, buckets, acc);
            break;
    }
}
