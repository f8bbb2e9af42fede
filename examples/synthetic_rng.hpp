#pragma once
// What the example and the benchmarks share: a small deterministic random source for
// synthetic keys and values (not part of the library).

#include <cmath>
#include <cstdint>

namespace shadowkv_examples {

/// SplitMix64: cheap, deterministic, good enough for test data (the demo draws ~10^8 numbers).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform integer in [0, n), n >= 1 (modulo: a bias below n / 2^64).
  std::uint64_t below(std::uint64_t n) { return next() % n; }
  /// Uniform in (0, 1).
  float uniform() { return (static_cast<float>(next() >> 40) + 0.5f) * 0x1.0p-24f; }
  /// Uniform with mean 0 and variance 1.
  float unit_uniform() { return (2.0f * uniform() - 1.0f) * 1.7320508f; }
  /// Standard normal (Box-Muller, one of the pair cached).
  float normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const float r = std::sqrt(-2.0f * std::log(uniform()));
    const float a = 6.2831853f * uniform();
    spare_ = r * std::sin(a);
    has_spare_ = true;
    return r * std::cos(a);
  }

 private:
  std::uint64_t state_;
  float spare_ = 0.0f;
  bool has_spare_ = false;
};

}  // namespace shadowkv_examples
