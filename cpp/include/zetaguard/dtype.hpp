// Element types the engine reads, and exact conversions of the 16-bit formats.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace zetaguard {

enum class DType : std::uint8_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Storage-only wrappers so overloads can tell the two 16-bit formats apart.
struct f16_t {
    std::uint16_t bits;
};
struct bf16_t {
    std::uint16_t bits;
};

constexpr std::size_t dtype_size(DType t) noexcept {
    switch (t) {
        case DType::f32: return 4;
        case DType::f64: return 8;
        case DType::f16:
        case DType::bf16: return 2;
    }
    return 0;
}

const char* dtype_name(DType t) noexcept;

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN included).
inline float f16_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    std::uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        // Subnormal half: normalise the mantissa into a binary32 normal.
        exp = 113;
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline float bf16_to_float(std::uint16_t h) noexcept {
    const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline double to_double(float x) noexcept { return static_cast<double>(x); }
inline double to_double(double x) noexcept { return x; }
inline double to_double(f16_t x) noexcept { return static_cast<double>(f16_to_float(x.bits)); }
inline double to_double(bf16_t x) noexcept { return static_cast<double>(bf16_to_float(x.bits)); }

}  // namespace zetaguard
