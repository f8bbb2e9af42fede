/// \file test_rope.cpp
/// \brief RoPE variants against a float64 reference written here from the published formulas
/// (not through make_rope_table), plus the rotation's invariants and the validation errors.

#include <doctest/doctest.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "shadowkv/core/rope.hpp"
#include "shadowkv/device/rope.hpp"

namespace {

using shadowkv::RopeConfig;
using shadowkv::RopeLayout;
using shadowkv::RopeScaling;

constexpr double kPi = std::numbers::pi;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
/// Unit roundoff of float.
constexpr double kU = 0x1p-24;

// Tolerances, all relative to the norm r of the pair (or vector) being rotated, times the
// attention scale:
//  * kPairTol: the library and the reference rotate by the same angle (both form
//    position * float(inv_freq) exactly in double), so what is left is float arithmetic:
//    cos and sin rounded to float (u each), two products and a sum per output (u each, on terms
//    bounded by r), i.e. below 5*sqrt(2)*u*r; 8u leaves headroom.
//  * against the unrounded double frequencies the float storage of inv_freq adds an angle error
//    of position * inv_freq * u (half an ulp, relative), taken as 2u for safety.
constexpr double kPairTol = 8 * kU;

std::uint32_t test_seed() {
  static const std::uint32_t seed = [] {
    if (const char* env = std::getenv("SHADOWKV_TEST_SEED"))
      return static_cast<std::uint32_t>(std::stoul(env));
    return static_cast<std::uint32_t>(std::random_device{}());
  }();
  return seed;
}

std::vector<float> random_vector(std::mt19937& rng, int n) {
  std::uniform_real_distribution<float> value(-2.0f, 2.0f);
  std::vector<float> x(n);
  for (float& v : x) v = value(rng);
  return x;
}

// ---- Reference frequencies, one function per published formula (float64) -------------------

/// theta^(-2i/d), i in [0, d/2), via exp/log so it does not share code with the library.
std::vector<double> ref_plain(double theta, int d) {
  std::vector<double> f(d / 2);
  for (int i = 0; i < d / 2; ++i) f[i] = std::exp(-(2.0 * i / d) * std::log(theta));
  return f;
}

std::vector<double> ref_linear(double theta, int d, double factor) {
  std::vector<double> f = ref_plain(theta, d);
  for (double& v : f) v = v / factor;
  return f;
}

/// Static NTK-aware: the base is stretched so the lowest frequency is divided by ~factor.
std::vector<double> ref_ntk(double theta, int d, double factor) {
  return ref_plain(theta * std::pow(factor, d / (d - 2.0)), d);
}

/// Llama 3.1 (HF `_compute_llama3_parameters`); `bands` counts low/medium/high frequencies.
std::vector<double> ref_llama3(double theta, int d, double factor, double low, double high,
                               double orig, int bands[3] = nullptr) {
  std::vector<double> f = ref_plain(theta, d);
  for (double& v : f) {
    const double wavelen = 2 * kPi / v;
    if (wavelen > orig / low) {  // long wavelength: interpolate fully
      v = v / factor;
      if (bands) ++bands[0];
    } else if (wavelen < orig / high) {  // short wavelength: keep
      if (bands) ++bands[2];
    } else {
      const double s = (orig / wavelen - low) / (high - low);
      v = (1 - s) * (v / factor) + s * v;
      if (bands) ++bands[1];
    }
  }
  return f;
}

/// YaRN (HF `_compute_yarn_parameters`, truncate=true, no mscale/mscale_all_dim).
std::vector<double> ref_yarn(double theta, int d, double factor, double orig, double beta_fast,
                             double beta_slow, double* mscale) {
  // Dimension index where a frequency completes n turns over `orig` positions:
  // orig * theta^(-2j/d) = 2*pi*n  =>  j = d * ln(orig / (2*pi*n)) / (2 ln theta).
  auto dim_for_turns = [&](double n) {
    return d * std::log(orig / (2 * kPi * n)) / (2 * std::log(theta));
  };
  const double lo = std::max(std::floor(dim_for_turns(beta_fast)), 0.0);
  double hi = std::min(std::ceil(dim_for_turns(beta_slow)), d - 1.0);
  if (hi == lo) hi += 0.001;
  std::vector<double> f = ref_plain(theta, d);
  for (int i = 0; i < d / 2; ++i) {
    double ramp = (i - lo) / (hi - lo);
    ramp = ramp < 0 ? 0 : (ramp > 1 ? 1 : ramp);
    const double extrapolation_weight = 1 - ramp;
    f[i] = (f[i] / factor) * (1 - extrapolation_weight) + f[i] * extrapolation_weight;
  }
  *mscale = factor <= 1 ? 1.0 : 0.1 * std::log(factor) + 1.0;
  return f;
}

// ---- Reference rotation -----------------------------------------------------------------------

/// Rotates x (double) with per-pair frequencies `f`: pair (a, b) as the complex number a + ib,
/// multiplied by scale * e^(i * position * f).
std::vector<double> ref_rotate(const std::vector<float>& x, long long position,
                               const std::vector<double>& f, double scale, int rotary_dim,
                               bool interleaved) {
  std::vector<double> y(x.begin(), x.end());
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    const std::complex<double> z(x[a], x[b]);
    const std::complex<double> w = z * std::polar(scale, static_cast<double>(position) * f[i]);
    y[a] = w.real();
    y[b] = w.imag();
  }
  return y;
}

struct Variant {
  const char* name;
  RopeConfig cfg;
  bool half_rotary;  ///< rotary_dim = head_dim/2 (GLM-4)
  /// Reference frequencies [rotary_dim/2] and attention scale.
  std::function<std::vector<double>(int rotary_dim, double* scale)> reference;
};

std::vector<Variant> variants() {
  std::vector<Variant> v;
  {
    RopeConfig c;
    c.theta = 10000.0;
    v.push_back({"half_split full (Llama 2)", c, false, [](int d, double* s) {
                   *s = 1.0;
                   return ref_plain(10000.0, d);
                 }});
  }
  {
    RopeConfig c;
    c.layout = RopeLayout::interleaved;
    c.theta = 10000.0;
    v.push_back({"interleaved partial rotary_dim=head_dim/2 (GLM-4)", c, true,
                 [](int d, double* s) {
                   *s = 1.0;
                   return ref_plain(10000.0, d);
                 }});
  }
  {
    RopeConfig c;
    c.theta = 500000.0;
    c.scaling = RopeScaling::llama3;
    c.factor = 8.0;
    c.low_freq_factor = 1.0;
    c.high_freq_factor = 4.0;
    c.original_max_position = 8192;
    v.push_back({"llama3 (Llama 3.1)", c, false, [](int d, double* s) {
                   *s = 1.0;
                   return ref_llama3(500000.0, d, 8.0, 1.0, 4.0, 8192.0);
                 }});
  }
  {
    RopeConfig c;
    c.scaling = RopeScaling::linear;
    c.factor = 4.0;
    v.push_back({"linear factor 4", c, false, [](int d, double* s) {
                   *s = 1.0;
                   return ref_linear(10000.0, d, 4.0);
                 }});
  }
  {
    RopeConfig c;
    c.scaling = RopeScaling::ntk;
    c.factor = 4.0;
    v.push_back({"static ntk factor 4", c, false, [](int d, double* s) {
                   *s = 1.0;
                   return ref_ntk(10000.0, d, 4.0);
                 }});
  }
  {
    RopeConfig c;
    c.theta = 1000000.0;
    c.scaling = RopeScaling::yarn;
    c.factor = 4.0;
    c.original_max_position = 4096;
    v.push_back({"yarn factor 4 orig 4096 (Qwen2)", c, false, [](int d, double* s) {
                   return ref_yarn(1000000.0, d, 4.0, 4096.0, 32.0, 1.0, s);
                 }});
  }
  {
    // Not a shipped model; covers partial rotary together with a scaled, mscaled table.
    RopeConfig c;
    c.theta = 1000000.0;
    c.scaling = RopeScaling::yarn;
    c.factor = 4.0;
    c.original_max_position = 4096;
    v.push_back({"yarn half_split partial", c, true, [](int d, double* s) {
                   return ref_yarn(1000000.0, d, 4.0, 4096.0, 32.0, 1.0, s);
                 }});
  }
  return v;
}

constexpr int kHeadDims[] = {64, 96, 128, 256};

/// Fixed positions (0, 1, around the original contexts, long context) plus random ones.
std::vector<long long> positions(std::mt19937& rng) {
  std::vector<long long> p = {0, 1, 2, 3, 4095, 4096, 8191, 8192, 32767, 131071, 500000};
  std::uniform_int_distribution<long long> random_position(0, 1 << 20);
  for (int i = 0; i < 4; ++i) p.push_back(random_position(rng));
  return p;
}

/// Float rounding of a double frequency, or false when the double lies so close to the midpoint
/// of two floats that evaluation-order noise could round it either way.
bool round_unambiguously(double v, double& rounded) {
  const float f = static_cast<float>(v);
  const float other = std::nextafter(f, v > f ? kInf : -kInf);
  const double midpoint = 0.5 * (static_cast<double>(f) + static_cast<double>(other));
  rounded = f;
  return std::abs(v - midpoint) > 1e-12 * std::abs(v);
}

double pair_norm(const std::vector<float>& x, int i, int rotary_dim, bool interleaved) {
  const int a = interleaved ? 2 * i : i;
  const int b = interleaved ? 2 * i + 1 : i + rotary_dim / 2;
  return std::hypot(static_cast<double>(x[a]), static_cast<double>(x[b]));
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

void check_rejects(const RopeConfig& cfg, int head_dim, const std::string& expected) {
  CAPTURE(expected);
  bool threw = false;
  try {
    shadowkv::validate(cfg, head_dim);
  } catch (const shadowkv::Error& e) {
    threw = true;
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find(expected) != std::string::npos);
  }
  CHECK(threw);
  CHECK_THROWS_AS(shadowkv::make_rope_table(cfg, head_dim), shadowkv::Error);
}

}  // namespace

TEST_SUITE_BEGIN("rope");

TEST_CASE("rope: every variant matches the float64 reference") {
  const std::uint32_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937 rng(seed);
  for (const Variant& variant : variants()) {
    for (int head_dim : kHeadDims) {
      CAPTURE(variant.name);
      CAPTURE(head_dim);
      RopeConfig cfg = variant.cfg;
      if (variant.half_rotary) cfg.rotary_dim = head_dim / 2;
      const int rotary_dim = variant.half_rotary ? head_dim / 2 : head_dim;
      const bool interleaved = cfg.layout == RopeLayout::interleaved;
      const shadowkv::RopeTable table = shadowkv::make_rope_table(cfg, head_dim);
      double ref_scale = 0;
      const std::vector<double> ref_freq = variant.reference(rotary_dim, &ref_scale);

      // The table: each entry is the double formula rounded to float (half an ulp; 2u allows
      // for the library evaluating the formula in a different order).
      REQUIRE(table.head_dim == head_dim);
      REQUIRE(table.rotary_dim == rotary_dim);
      REQUIRE(table.layout == cfg.layout);
      REQUIRE(table.inv_freq.size() == static_cast<std::size_t>(rotary_dim / 2));
      CHECK(std::abs(table.attention_scale - ref_scale) <= 2 * kU * ref_scale);
      for (int i = 0; i < rotary_dim / 2; ++i) {
        CAPTURE(i);
        CHECK(std::abs(table.inv_freq[i] - ref_freq[i]) <= 2 * kU * ref_freq[i]);
      }

      // The reference rotates with the frequencies and scale rounded to float, as stored.
      std::vector<double> stored_freq(ref_freq.size());
      std::vector<bool> unambiguous(ref_freq.size());
      for (std::size_t i = 0; i < ref_freq.size(); ++i)
        unambiguous[i] = round_unambiguously(ref_freq[i], stored_freq[i]);
      const double stored_scale = static_cast<float>(ref_scale);

      for (long long position : positions(rng)) {
        CAPTURE(position);
        const std::vector<float> x = random_vector(rng, head_dim);
        std::vector<float> y = x;
        table.apply(y.data(), position);
        const std::vector<double> tight =
            ref_rotate(x, position, stored_freq, stored_scale, rotary_dim, interleaved);
        const std::vector<double> exact =
            ref_rotate(x, position, ref_freq, ref_scale, rotary_dim, interleaved);
        for (int i = 0; i < rotary_dim / 2; ++i) {
          CAPTURE(i);
          const int a = interleaved ? 2 * i : i;
          const int b = interleaved ? 2 * i + 1 : i + rotary_dim / 2;
          const double r = pair_norm(x, i, rotary_dim, interleaved) * ref_scale;
          const double err_tight = std::hypot(y[a] - tight[a], y[b] - tight[b]);
          if (unambiguous[i]) CHECK(err_tight <= kPairTol * r);
          const double angle_err = 2 * kU * static_cast<double>(position) * ref_freq[i];
          const double err_exact = std::hypot(y[a] - exact[a], y[b] - exact[b]);
          CHECK(err_exact <= (kPairTol + 2 * kU + angle_err) * r);
        }
        for (int j = rotary_dim; j < head_dim; ++j) {
          CAPTURE(j);
          CHECK(y[j] == x[j]);  // pass-through, bit for bit
        }
      }
    }
  }
}

TEST_CASE("rope: the llama3 test configuration exercises all three frequency bands") {
  int bands[3] = {0, 0, 0};
  ref_llama3(500000.0, 128, 8.0, 1.0, 4.0, 8192.0, bands);
  CHECK(bands[0] > 0);
  CHECK(bands[1] > 0);
  CHECK(bands[2] > 0);
}

TEST_CASE("rope: yarn attention_factor overrides the default mscale") {
  RopeConfig cfg;
  cfg.scaling = RopeScaling::yarn;
  cfg.factor = 4.0;
  cfg.attention_factor = 1.25;
  CHECK(shadowkv::make_rope_table(cfg, 128).attention_scale == 1.25f);
  cfg.attention_factor = 0.0;
  CHECK(std::abs(shadowkv::make_rope_table(cfg, 128).attention_scale -
                 (0.1 * std::log(4.0) + 1.0)) <= 2 * kU * 1.2);
  cfg.scaling = RopeScaling::linear;  // the others are never scaled
  cfg.attention_factor = 1.25;
  CHECK(shadowkv::make_rope_table(cfg, 128).attention_scale == 1.0f);
}

TEST_CASE("rope: rotation preserves the norm (times the attention scale)") {
  const std::uint32_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<long long> random_position(0, 1000000);
  for (const Variant& variant : variants()) {
    for (int head_dim : kHeadDims) {
      CAPTURE(variant.name);
      CAPTURE(head_dim);
      RopeConfig cfg = variant.cfg;
      if (variant.half_rotary) cfg.rotary_dim = head_dim / 2;
      const shadowkv::RopeTable table = shadowkv::make_rope_table(cfg, head_dim);
      const double scale = table.attention_scale;
      for (int trial = 0; trial < 8; ++trial) {
        const long long position = random_position(rng);
        CAPTURE(position);
        const std::vector<float> x = random_vector(rng, head_dim);
        std::vector<float> y = x;
        table.apply(y.data(), position);
        // Any angle preserves the norm, so only the per-pair rounding (kPairTol) remains.
        double rotated = 0;
        double original = 0;
        for (int j = 0; j < table.rotary_dim; ++j) {
          rotated += static_cast<double>(y[j]) * y[j];
          original += static_cast<double>(x[j]) * x[j];
        }
        CHECK(std::abs(std::sqrt(rotated) - scale * std::sqrt(original)) <=
              kPairTol * scale * std::sqrt(original));
      }
    }
  }
}

TEST_CASE("rope: half_split scores depend only on the relative offset") {
  const std::uint32_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<long long> random_position(0, 600000);
  RopeConfig plain;
  RopeConfig llama3;
  llama3.theta = 500000.0;
  llama3.scaling = RopeScaling::llama3;
  llama3.factor = 8.0;
  for (const RopeConfig& cfg : {plain, llama3}) {
    for (int head_dim : kHeadDims) {
      CAPTURE(shadowkv::to_string(cfg.scaling));
      CAPTURE(head_dim);
      const shadowkv::RopeTable table = shadowkv::make_rope_table(cfg, head_dim);
      for (int trial = 0; trial < 16; ++trial) {
        long long p = random_position(rng);
        long long p2 = random_position(rng);
        if (trial == 0) p = 0;
        if (trial == 1) p2 = p + 131071;
        CAPTURE(p);
        CAPTURE(p2);
        const std::vector<float> q = random_vector(rng, head_dim);
        const std::vector<float> k = random_vector(rng, head_dim);
        std::vector<float> q_at_p = q;
        std::vector<float> k_at_p2 = k;
        table.apply(q_at_p.data(), p);
        table.apply(k_at_p2.data(), p2);
        // <R(p)q, R(p2)k> = <q, R(p2-p)k> (or <R(p-p2)q, k> when p2 < p): rotate one side only.
        std::vector<float> q_rel = q;
        std::vector<float> k_rel = k;
        if (p2 >= p) {
          table.apply(k_rel.data(), p2 - p);
        } else {
          table.apply(q_rel.data(), p - p2);
        }
        // All three rotations use the same stored frequencies and form their angles exactly in
        // double, so the identity holds up to the float rounding of each rotated pair: three
        // rotations, kPairTol each, on terms bounded by |q_pair| * |k_pair|.
        double bound = 0;
        for (int i = 0; i < head_dim / 2; ++i)
          bound += pair_norm(q, i, head_dim, false) * pair_norm(k, i, head_dim, false);
        CHECK(std::abs(dot(q_at_p, k_at_p2) - dot(q_rel, k_rel)) <= 3 * kPairTol * bound);
      }
    }
  }
}

TEST_CASE("rope: the float-only device path matches the double angle") {
  const std::uint32_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937 rng(seed);
  const shadowkv::RopeTable table = shadowkv::make_rope_table(RopeConfig{}, 128);
  std::uniform_int_distribution<long long> random_position(0, (1LL << 26) - 1);
  for (int trial = 0; trial < 20000; ++trial) {
    long long position = random_position(rng);
    if (trial < 4) position = std::vector<long long>{0, 1, 131071, 500000}[trial];
    const float inv_freq = table.inv_freq[trial % table.inv_freq.size()];
    CAPTURE(position);
    CAPTURE(inv_freq);
    // position < 2^26 and inv_freq 24 bits: the product is exact in double.
    const double angle = static_cast<double>(position) * inv_freq;
    float c = 0;
    float s = 0;
    shadowkv::device::detail::rope_cos_sin_f32(position, inv_freq, 1.0f, c, s);
    // Angle error of the float reduction <= ~4e-7 rad (three roundings of a value below 4),
    // plus sincosf's ~1 ulp.
    CHECK(std::abs(c - std::cos(angle)) <= 1e-6);
    CHECK(std::abs(s - std::sin(angle)) <= 1e-6);
  }
  float c = 0;
  float s = 0;
  shadowkv::device::detail::rope_cos_sin_f32(131071, 1.0f, 1.5f, c, s);
  CHECK(std::abs(c - 1.5 * std::cos(131071.0)) <= 2e-6);
  CHECK(std::abs(s - 1.5 * std::sin(131071.0)) <= 2e-6);
}

TEST_CASE("rope: validate names the invalid field") {
  const RopeConfig ok;
  CHECK_NOTHROW(shadowkv::validate(ok, 64));

  check_rejects(ok, 0, "head_dim=0");
  check_rejects(ok, -64, "head_dim=-64");
  check_rejects(ok, 65, "rope.rotary_dim=0");

  auto with = [](auto mutate) {
    RopeConfig c;
    mutate(c);
    return c;
  };
  check_rejects(with([](RopeConfig& c) { c.rotary_dim = 70; }), 64,
                "rope.rotary_dim=70 must be even and in [2, head_dim=64]");
  check_rejects(with([](RopeConfig& c) { c.rotary_dim = -2; }), 64, "rope.rotary_dim=-2");
  check_rejects(with([](RopeConfig& c) { c.rotary_dim = 33; }), 64, "rope.rotary_dim=33");
  check_rejects(with([](RopeConfig& c) { c.layout = static_cast<RopeLayout>(7); }), 64,
                "unknown rope.layout=7");
  check_rejects(with([](RopeConfig& c) { c.scaling = static_cast<RopeScaling>(9); }), 64,
                "unknown rope.scaling=9");
  for (double theta : {0.0, -1.0, 1.0, kNaN, kInf}) {
    CAPTURE(theta);
    check_rejects(with([&](RopeConfig& c) { c.theta = theta; }), 64, "rope.theta=");
  }
  for (RopeScaling scaling :
       {RopeScaling::linear, RopeScaling::ntk, RopeScaling::yarn, RopeScaling::llama3}) {
    for (double factor : {0.0, -2.0, 0.5, kNaN, kInf}) {
      CAPTURE(shadowkv::to_string(scaling));
      CAPTURE(factor);
      check_rejects(with([&](RopeConfig& c) {
                      c.scaling = scaling;
                      c.factor = factor;
                    }),
                    64, "rope.factor=");
    }
  }
  check_rejects(with([](RopeConfig& c) {
                  c.scaling = RopeScaling::ntk;
                  c.factor = 2.0;
                  c.rotary_dim = 2;
                }),
                64, "rope.rotary_dim=2");
  for (RopeScaling scaling : {RopeScaling::yarn, RopeScaling::llama3}) {
    CAPTURE(shadowkv::to_string(scaling));
    check_rejects(with([&](RopeConfig& c) {
                    c.scaling = scaling;
                    c.original_max_position = 0;
                  }),
                  64, "rope.original_max_position=0");
  }
  check_rejects(with([](RopeConfig& c) {
                  c.scaling = RopeScaling::llama3;
                  c.low_freq_factor = 0.0;
                }),
                64, "rope.low_freq_factor=0");
  check_rejects(with([](RopeConfig& c) {
                  c.scaling = RopeScaling::llama3;
                  c.low_freq_factor = 4.0;
                  c.high_freq_factor = 4.0;
                }),
                64, "rope.high_freq_factor=4");
  check_rejects(with([](RopeConfig& c) {
                  c.scaling = RopeScaling::yarn;
                  c.beta_slow = 0.0;
                }),
                64, "rope.beta_slow=0");
  check_rejects(with([](RopeConfig& c) {
                  c.scaling = RopeScaling::yarn;
                  c.beta_fast = 1.0;
                  c.beta_slow = 1.0;
                }),
                64, "rope.beta_fast=1");
  check_rejects(with([](RopeConfig& c) {
                  c.scaling = RopeScaling::yarn;
                  c.attention_factor = -1.0;
                }),
                64, "rope.attention_factor=-1");

  // Fields the selected scaling does not use are not validated.
  CHECK_NOTHROW(shadowkv::validate(with([](RopeConfig& c) {
                                     c.factor = 0.0;
                                     c.beta_fast = 0.0;
                                     c.low_freq_factor = 9.0;
                                     c.original_max_position = -1;
                                   }),
                                   64));
  const shadowkv::RopeTable table = shadowkv::make_rope_table(ok, 64);
  std::vector<float> x(64, 1.0f);
  CHECK_THROWS_AS(table.apply(x.data(), -1), shadowkv::Error);
}

TEST_CASE("rope: parse_rope_scaling") {
  CHECK(shadowkv::parse_rope_scaling("none") == RopeScaling::none);
  CHECK(shadowkv::parse_rope_scaling("default") == RopeScaling::none);
  CHECK(shadowkv::parse_rope_scaling("linear") == RopeScaling::linear);
  CHECK(shadowkv::parse_rope_scaling("ntk") == RopeScaling::ntk);
  CHECK(shadowkv::parse_rope_scaling("yarn") == RopeScaling::yarn);
  CHECK(shadowkv::parse_rope_scaling("llama3") == RopeScaling::llama3);
  for (RopeScaling s : {RopeScaling::none, RopeScaling::linear, RopeScaling::ntk,
                        RopeScaling::yarn, RopeScaling::llama3})
    CHECK(shadowkv::parse_rope_scaling(shadowkv::to_string(s)) == s);
  CHECK(std::string(shadowkv::to_string(RopeLayout::half_split)) == "half_split");
  CHECK(std::string(shadowkv::to_string(RopeLayout::interleaved)) == "interleaved");

  for (const char* name : {"foo", "", "Linear", "dynamic", "longrope"}) {
    CAPTURE(name);
    bool threw = false;
    try {
      shadowkv::parse_rope_scaling(name);
    } catch (const shadowkv::Error& e) {
      threw = true;
      const std::string what = e.what();
      CAPTURE(what);
      CHECK(what.find("rope_scaling") != std::string::npos);
      CHECK(what.find(std::string("'") + name + "'") != std::string::npos);
    }
    CHECK(threw);
  }
}

TEST_CASE("rope: apply_consecutive equals apply row by row") {
  const auto seed = std::random_device{}();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist;
  shadowkv::RopeConfig cfgs[3];
  cfgs[1].layout = shadowkv::RopeLayout::interleaved;
  cfgs[1].rotary_dim = 64;
  cfgs[2].scaling = shadowkv::RopeScaling::yarn;
  cfgs[2].factor = 4;
  cfgs[2].original_max_position = 4096;
  for (const auto& cfg : cfgs) {
    const auto table = shadowkv::make_rope_table(cfg, 128);
    const long long first = static_cast<long long>(rng() % 600000), n = 1 + static_cast<long long>(rng() % 40);
    std::vector<float> a(n * 128), b;
    for (auto& x : a) x = dist(rng);
    b = a;
    table.apply_consecutive(a.data(), n, 128, first);
    for (long long r = 0; r < n; ++r) table.apply(b.data() + r * 128, first + r);
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-5).scale(1.0));
  }
}

TEST_SUITE_END();
