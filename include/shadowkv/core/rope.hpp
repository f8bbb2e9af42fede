#pragma once
/// \file core/rope.hpp
/// \brief Rotary position embedding configuration and its precomputed frequency table: the
/// variants Llama, Qwen, Yi and GLM-4 checkpoints use (plain, linear, static NTK-aware, YaRN,
/// Llama 3), with the scaling formulas of Hugging Face transformers' rope init functions.
/// The rotation itself lives in device/rope.hpp, shared with the CUDA kernels.

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string_view>
#include <vector>

#include "../device/rope.hpp"
#include "error.hpp"

namespace shadowkv {

/// Which dimensions form a rotated pair.
enum class RopeLayout {
  half_split,   ///< pair i is (i, i + rotary_dim/2): Llama, Qwen, Yi (HF `rotate_half`)
  interleaved,  ///< pair i is (2i, 2i+1): GLM-4
};

/// How the base frequencies are rescaled for contexts beyond the trained length.
enum class RopeScaling {
  none,    ///< HF "default"
  linear,  ///< position interpolation: every frequency divided by `factor`
  ntk,     ///< static NTK-aware: base raised to theta * factor^(rotary_dim/(rotary_dim-2))
  yarn,    ///< YaRN: per-frequency blend of interpolation and extrapolation, plus mscale
  llama3,  ///< Llama 3.1: low frequencies divided by `factor`, a smooth band, high ones kept
};

/// RoPE parameters as a checkpoint's config.json states them (`rope_theta`, `rope_scaling`,
/// `partial_rotary_factor`). Fields a variant does not use are ignored and not validated.
struct RopeConfig {
  RopeLayout layout = RopeLayout::half_split;
  int rotary_dim = 0;                    ///< 0 means head_dim; dims >= rotary_dim pass through
  double theta = 10000.0;                ///< base
  RopeScaling scaling = RopeScaling::none;
  double factor = 1.0;                   ///< linear / ntk / yarn / llama3
  int original_max_position = 8192;      ///< llama3 and yarn
  double low_freq_factor = 1.0;          ///< llama3
  double high_freq_factor = 4.0;         ///< llama3
  double beta_fast = 32.0;               ///< yarn
  double beta_slow = 1.0;                ///< yarn
  double attention_factor = 0.0;         ///< yarn; 0 means 0.1*ln(factor) + 1
};

inline const char* to_string(RopeScaling scaling) {
  switch (scaling) {
    case RopeScaling::none: return "none";
    case RopeScaling::linear: return "linear";
    case RopeScaling::ntk: return "ntk";
    case RopeScaling::yarn: return "yarn";
    case RopeScaling::llama3: return "llama3";
  }
  return "unknown";
}

inline const char* to_string(RopeLayout layout) {
  switch (layout) {
    case RopeLayout::half_split: return "half_split";
    case RopeLayout::interleaved: return "interleaved";
  }
  return "unknown";
}

/// Maps a config.json `rope_scaling.rope_type` (or legacy `type`) to `RopeScaling`:
/// "none"/"default", "linear", "ntk", "yarn", "llama3". HF's "dynamic" NTK is refused: it
/// re-derives the base from the running sequence length, which one fixed table cannot express;
/// "ntk" here is the static NTK-aware base (what "dynamic" gives at factor * original length).
inline RopeScaling parse_rope_scaling(std::string_view name) {
  if (name == "none" || name == "default") return RopeScaling::none;
  if (name == "linear") return RopeScaling::linear;
  if (name == "ntk") return RopeScaling::ntk;
  if (name == "yarn") return RopeScaling::yarn;
  if (name == "llama3") return RopeScaling::llama3;
  if (name == "dynamic")
    SHADOWKV_FAIL("rope_scaling='dynamic' is not supported: dynamic NTK depends on the sequence "
                  "length; use 'ntk' for the static NTK-aware base");
  SHADOWKV_FAIL("unknown rope_scaling='", name,
                "' (expected none, default, linear, ntk, yarn or llama3)");
}

namespace detail {

/// `cfg.rotary_dim`, with 0 resolved to `head_dim`.
inline int resolved_rotary_dim(const RopeConfig& cfg, int head_dim) {
  return cfg.rotary_dim == 0 ? head_dim : cfg.rotary_dim;
}

}  // namespace detail

/// Throws `shadowkv::Error` naming the first invalid field and its value. Checks head_dim > 0,
/// the enums, rotary_dim even in [2, head_dim] (0 = head_dim), theta finite and > 1 (YaRN and NTK
/// divide by ln(theta)), and for the selected scaling only: factor finite and >= 1 (as HF
/// requires; < 1 would extrapolate), ntk rotary_dim >= 4, llama3 original_max_position > 0 and
/// 0 < low_freq_factor < high_freq_factor, yarn original_max_position > 0,
/// 0 < beta_slow < beta_fast and attention_factor finite and >= 0.
inline void validate(const RopeConfig& cfg, int head_dim) {
  SHADOWKV_CHECK(head_dim > 0, "head_dim=", head_dim, " must be > 0");
  SHADOWKV_CHECK(cfg.layout == RopeLayout::half_split || cfg.layout == RopeLayout::interleaved,
                 "unknown rope.layout=", static_cast<int>(cfg.layout));
  switch (cfg.scaling) {
    case RopeScaling::none:
    case RopeScaling::linear:
    case RopeScaling::ntk:
    case RopeScaling::yarn:
    case RopeScaling::llama3: break;
    default: SHADOWKV_FAIL("unknown rope.scaling=", static_cast<int>(cfg.scaling));
  }
  if (cfg.rotary_dim == 0) {
    SHADOWKV_CHECK(head_dim >= 2 && head_dim % 2 == 0, "rope.rotary_dim=0 means head_dim=",
                   head_dim, ", which must be even to rotate in pairs");
  } else {
    SHADOWKV_CHECK(cfg.rotary_dim >= 2 && cfg.rotary_dim <= head_dim && cfg.rotary_dim % 2 == 0,
                   "rope.rotary_dim=", cfg.rotary_dim, " must be even and in [2, head_dim=",
                   head_dim, "] (or 0 for head_dim)");
  }
  SHADOWKV_CHECK(std::isfinite(cfg.theta) && cfg.theta > 1.0, "rope.theta=", cfg.theta,
                 " must be finite and > 1");
  if (cfg.scaling == RopeScaling::none) return;

  SHADOWKV_CHECK(std::isfinite(cfg.factor) && cfg.factor >= 1.0, "rope.factor=", cfg.factor,
                 " must be finite and >= 1 for rope.scaling=", to_string(cfg.scaling));
  if (cfg.scaling == RopeScaling::ntk) {
    const int rotary_dim = detail::resolved_rotary_dim(cfg, head_dim);
    SHADOWKV_CHECK(rotary_dim >= 4, "rope.rotary_dim=", rotary_dim,
                   " must be >= 4 for rope.scaling=ntk (base exponent rotary_dim/(rotary_dim-2))");
  }
  if (cfg.scaling == RopeScaling::llama3 || cfg.scaling == RopeScaling::yarn) {
    SHADOWKV_CHECK(cfg.original_max_position > 0, "rope.original_max_position=",
                   cfg.original_max_position, " must be > 0 for rope.scaling=",
                   to_string(cfg.scaling));
  }
  if (cfg.scaling == RopeScaling::llama3) {
    SHADOWKV_CHECK(std::isfinite(cfg.low_freq_factor) && cfg.low_freq_factor > 0.0,
                   "rope.low_freq_factor=", cfg.low_freq_factor, " must be finite and > 0");
    SHADOWKV_CHECK(std::isfinite(cfg.high_freq_factor) &&
                       cfg.high_freq_factor > cfg.low_freq_factor,
                   "rope.high_freq_factor=", cfg.high_freq_factor,
                   " must be finite and > rope.low_freq_factor=", cfg.low_freq_factor);
  }
  if (cfg.scaling == RopeScaling::yarn) {
    SHADOWKV_CHECK(std::isfinite(cfg.beta_slow) && cfg.beta_slow > 0.0, "rope.beta_slow=",
                   cfg.beta_slow, " must be finite and > 0");
    SHADOWKV_CHECK(std::isfinite(cfg.beta_fast) && cfg.beta_fast > cfg.beta_slow,
                   "rope.beta_fast=", cfg.beta_fast, " must be finite and > rope.beta_slow=",
                   cfg.beta_slow);
    SHADOWKV_CHECK(std::isfinite(cfg.attention_factor) && cfg.attention_factor >= 0.0,
                   "rope.attention_factor=", cfg.attention_factor,
                   " must be finite and >= 0 (0 means 0.1*ln(factor)+1)");
  }
}

/// Frequencies of one RoPE configuration, precomputed in double and stored in float.
struct RopeTable {
  RopeLayout layout = RopeLayout::half_split;
  int head_dim = 0;
  int rotary_dim = 0;
  float attention_scale = 1.0f;  ///< multiplies cos and sin (YaRN mscale), 1 otherwise
  std::vector<float> inv_freq;   ///< [rotary_dim/2], after scaling

  /// Rotates one head vector `x` [head_dim] (float, in place) to `position` (>= 0); dims
  /// >= rotary_dim are left unchanged. Uses `device::apply_rope`, as the CUDA kernels do.
  void apply(float* x, long long position) const {
    SHADOWKV_CHECK(position >= 0, "position=", position, " must be >= 0");
    device::apply_rope(x, position, inv_freq.data(), rotary_dim,
                       layout == RopeLayout::interleaved, attention_scale);
  }

  /// Rotates `n` head vectors `rows[r * stride ...]` to the consecutive positions
  /// `first_position + r`. Same result as `apply` per row (to ~1e-15 relative in the angles):
  /// one sin/cos per pair, then the angle addition formula in float64 from row to row, which
  /// is what makes rebuilding a chunk's keys cheap on the CPU.
  void apply_consecutive(float* rows, long long n, long long stride, long long first_position) const {
    SHADOWKV_CHECK(first_position >= 0, "position=", first_position, " must be >= 0");
    const int half = rotary_dim / 2;
    const bool inter = layout == RopeLayout::interleaved;
    for (int i = 0; i < half; ++i) {
      const double f = static_cast<double>(inv_freq[i]);
      double c = std::cos(static_cast<double>(first_position) * f);
      double s = std::sin(static_cast<double>(first_position) * f);
      const double step_c = std::cos(f), step_s = std::sin(f);
      const int i0 = inter ? 2 * i : i;
      const int i1 = inter ? 2 * i + 1 : i + half;
      for (long long r = 0; r < n; ++r) {
        device::rotate_pair(rows[r * stride + i0], rows[r * stride + i1],
                            static_cast<float>(c * attention_scale), static_cast<float>(s * attention_scale));
        const double next_c = c * step_c - s * step_s;
        s = s * step_c + c * step_s;
        c = next_c;
      }
    }
  }
};

/// Llama 3.1 / 3.2 / 3.3 (config.json: rope_theta 500000, rope_scaling llama3, factor 8,
/// low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192).
inline RopeConfig llama31_rope() {
  RopeConfig cfg;
  cfg.theta = 500000.0;
  cfg.scaling = RopeScaling::llama3;
  cfg.factor = 8.0;
  cfg.low_freq_factor = 1.0;
  cfg.high_freq_factor = 4.0;
  cfg.original_max_position = 8192;
  return cfg;
}

namespace detail {

/// HF `_compute_yarn_parameters`: the fractional dimension index at which a frequency makes
/// `num_rotations` turns over `max_position` positions.
inline double yarn_correction_dim(double num_rotations, int dim, double base, double max_position) {
  const double angle_over_context = num_rotations * 2.0 * std::numbers::pi;
  return dim * std::log(max_position / angle_over_context) / (2.0 * std::log(base));
}

}  // namespace detail

/// Validates `cfg` for `head_dim`, then builds its table:
/// inv_freq[i] = theta^(-2i/rotary_dim), i in [0, rotary_dim/2), rescaled per `cfg.scaling`.
inline RopeTable make_rope_table(const RopeConfig& cfg, int head_dim) {
  validate(cfg, head_dim);
  const int rotary_dim = detail::resolved_rotary_dim(cfg, head_dim);
  const int half = rotary_dim / 2;

  double base = cfg.theta;
  if (cfg.scaling == RopeScaling::ntk)
    base = cfg.theta * std::pow(cfg.factor, static_cast<double>(rotary_dim) / (rotary_dim - 2));
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i)
    inv_freq[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / rotary_dim);

  double attention_scale = 1.0;
  switch (cfg.scaling) {
    case RopeScaling::none:
    case RopeScaling::ntk: break;
    case RopeScaling::linear:
      for (double& f : inv_freq) f /= cfg.factor;
      break;
    case RopeScaling::llama3: {
      const double orig = cfg.original_max_position;
      const double low_freq_wavelen = orig / cfg.low_freq_factor;
      const double high_freq_wavelen = orig / cfg.high_freq_factor;
      for (double& f : inv_freq) {
        const double wavelen = 2.0 * std::numbers::pi / f;
        if (wavelen > low_freq_wavelen) {
          f /= cfg.factor;
        } else if (wavelen >= high_freq_wavelen) {
          const double smooth = (orig / wavelen - cfg.low_freq_factor) /
                                (cfg.high_freq_factor - cfg.low_freq_factor);
          f = (1.0 - smooth) * f / cfg.factor + smooth * f;
        }
      }
      break;
    }
    case RopeScaling::yarn: {
      // Dimensions that turn more than beta_fast times within the original context keep their
      // frequency (extrapolate), those turning fewer than beta_slow times are interpolated by
      // `factor`, with a linear ramp between; HF truncates the range to whole dimensions.
      const double orig = cfg.original_max_position;
      const double low = std::max(
          std::floor(detail::yarn_correction_dim(cfg.beta_fast, rotary_dim, cfg.theta, orig)), 0.0);
      double high = std::min(
          std::ceil(detail::yarn_correction_dim(cfg.beta_slow, rotary_dim, cfg.theta, orig)),
          static_cast<double>(rotary_dim - 1));
      if (low == high) high += 0.001;  // as HF: avoid a zero-width ramp
      for (int i = 0; i < half; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extrapolation = inv_freq[i];
        const double interpolation = extrapolation / cfg.factor;
        inv_freq[i] = interpolation * ramp + extrapolation * (1.0 - ramp);
      }
      attention_scale = cfg.attention_factor > 0.0 ? cfg.attention_factor
                                                   : 0.1 * std::log(cfg.factor) + 1.0;
      break;
    }
  }

  RopeTable table;
  table.layout = cfg.layout;
  table.head_dim = head_dim;
  table.rotary_dim = rotary_dim;
  table.attention_scale = static_cast<float>(attention_scale);
  table.inv_freq.assign(inv_freq.begin(), inv_freq.end());
  return table;
}

}  // namespace shadowkv
