// Cache-line-aligned vectors for the buffers the sketch kernel reads and writes a whole SIMD
// vector at a time: a 64-byte vector at a 16-byte-aligned address splits across two cache
// lines, and split loads and stores cost the sketch pass a large share of its speed.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace zetaguard {

inline constexpr std::size_t kCacheLine = 64;

template <class T>
struct CacheAligned {
    using value_type = T;
    CacheAligned() noexcept = default;
    template <class U>
    CacheAligned(const CacheAligned<U>&) noexcept {}
    T* allocate(std::size_t n) {
        return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLine}));
    }
    void deallocate(T* p, std::size_t) noexcept {
        ::operator delete(p, std::align_val_t{kCacheLine});
    }
    template <class U>
    bool operator==(const CacheAligned<U>&) const noexcept { return true; }
    template <class U>
    bool operator!=(const CacheAligned<U>&) const noexcept { return false; }
};

template <class T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

}  // namespace zetaguard
