// Portable, reproducible random numbers for phi3edge's sampler.
//
// The stream of a row is fully specified here (no <random> distributions, whose output is
// implementation-defined), so the same (seed, row_index) gives the same tokens on every platform:
//   start  = mix(mix(seed) ^ row_index)            mix = splitmix64's finaliser
//   words  = the first four outputs of splitmix64 started at `start` -> xoshiro256** state
//   draw   = (xoshiro256**() >> 11) * 2^-53        a double in [0, 1), one per row per step
#pragma once

#include <array>
#include <cstdint>

namespace phi3edge {

constexpr std::uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;

constexpr std::uint64_t splitmix64_mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// xoshiro256** 1.0 (Blackman & Vigna), seeded through splitmix64.
class Xoshiro256ss {
public:
    Xoshiro256ss(std::uint64_t seed, std::uint64_t stream) {
        std::uint64_t x = splitmix64_mix(splitmix64_mix(seed) ^ stream);
        for (auto& word : s_) {
            x += kGoldenGamma;
            word = splitmix64_mix(x);
        }
    }

    std::uint64_t next() {
        const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
        const std::uint64_t t = s_[1] << 17;
        s_[2] ^= s_[0];
        s_[3] ^= s_[1];
        s_[1] ^= s_[2];
        s_[0] ^= s_[3];
        s_[2] ^= t;
        s_[3] = rotl(s_[3], 45);
        return result;
    }

    // Uniform double in [0, 1) from the top 53 bits.
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

private:
    static constexpr std::uint64_t rotl(std::uint64_t x, int k) {
        return (x << k) | (x >> (64 - k));
    }

    std::array<std::uint64_t, 4> s_{};
};

}  // namespace phi3edge
