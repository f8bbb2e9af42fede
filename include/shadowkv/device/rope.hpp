#pragma once
/// \file device/rope.hpp
/// \brief Rotary position embedding of one head vector, written once for the CPU backend and for
/// CUDA kernels (`SHADOWKV_HOST_DEVICE`). The frequency table comes from
/// `shadowkv::make_rope_table` (core/rope.hpp); these functions only rotate.
///
/// Accuracy: the angle `position * inv_freq[i]` reaches ~1e6 rad at long context, where a plain
/// float product is off by ~0.03 rad. The host path forms the angle in double. The device path
/// stays in float but keeps the exact residual of the product and reduces modulo 2*pi with a
/// three-part constant, so its angle error is ~4e-7 rad for angles below 2^24 rad. Either way the
/// only sizeable error left is the float rounding of `inv_freq` itself (relative 2^-24).
/// Device code compiled with `--use_fast_math` maps `sincosf` to `__sincosf`, which is fine here
/// because the argument is already reduced to about [-pi, pi].

#include <cmath>

#include "../core/macros.hpp"

namespace shadowkv::device {

/// One pair rotated by the angle whose (scaled) cosine and sine are given:
/// `(x0, x1) <- (x0*cos_a - x1*sin_a, x0*sin_a + x1*cos_a)`, i.e. `x0 + i*x1` times `e^(i*angle)`.
/// Exposed for kernels that hold a pair in registers.
SHADOWKV_HOST_DEVICE void rotate_pair(float& x0, float& x1, float cos_a, float sin_a) {
  const float y0 = x0 * cos_a - x1 * sin_a;
  const float y1 = x0 * sin_a + x1 * cos_a;
  x0 = y0;
  x1 = y1;
}

namespace detail {

SHADOWKV_HOST_DEVICE float fma_f32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return ::fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SHADOWKV_HOST_DEVICE float rint_f32(float a) {
#if defined(__CUDA_ARCH__)
  return ::rintf(a);
#else
  return std::rint(a);
#endif
}

SHADOWKV_HOST_DEVICE void sincos_f32(float a, float& sin_a, float& cos_a) {
#if defined(__CUDA_ARCH__)
  ::sincosf(a, &sin_a, &cos_a);
#else
  sin_a = std::sin(a);
  cos_a = std::cos(a);
#endif
}

/// `attention_scale * cos/sin(position * inv_freq)` computed in float only (the device path;
/// callable on the host so tests can check it).
///
/// `position` is split into a float head and a float tail, each product is kept exactly with an
/// FMA residual, the head is reduced modulo 2*pi by Cody-Waite with 2*pi = kC1 + kC2 + kC3
/// (`a - k*kC1` is exact: both lie on the 2^-21 grid once a >= 4 and the difference is below 8,
/// which holds for angles up to ~1e8 rad), and the residuals are added after the reduction,
/// where they are no longer swamped by the size of the angle.
SHADOWKV_HOST_DEVICE void rope_cos_sin_f32(long long position, float inv_freq,
                                           float attention_scale, float& cos_a, float& sin_a) {
  constexpr float kC1 = 0x1.921fb6p+2f;     // float(2*pi)
  constexpr float kC2 = -0x1.777a5cp-23f;   // float(2*pi - kC1)
  constexpr float kC3 = -0x1.ee59dap-48f;   // float(2*pi - kC1 - kC2)
  constexpr float kInvTwoPi = 0x1.45f306p-3f;
  const float p_hi = static_cast<float>(position);
  const float p_lo = static_cast<float>(position - static_cast<long long>(p_hi));
  const float a = p_hi * inv_freq;
  const float a_lo = fma_f32(p_hi, inv_freq, -a) + p_lo * inv_freq;
  const float k = rint_f32(a * kInvTwoPi);
  float r = fma_f32(-k, kC1, a);
  r = fma_f32(-k, kC2, r);
  r = fma_f32(-k, kC3, r);
  r += a_lo;
  float s = 0.0f;
  float c = 0.0f;
  sincos_f32(r, s, c);
  cos_a = c * attention_scale;
  sin_a = s * attention_scale;
}

}  // namespace detail

/// `attention_scale * cos(position * inv_freq)` and `attention_scale * sin(...)`: the factors
/// `rotate_pair` takes. Double angle on the host, float (see `detail::rope_cos_sin_f32`) on the
/// device. `position >= 0`.
SHADOWKV_HOST_DEVICE void rope_cos_sin(long long position, float inv_freq, float attention_scale,
                                       float& cos_a, float& sin_a) {
#if defined(__CUDA_ARCH__)
  detail::rope_cos_sin_f32(position, inv_freq, attention_scale, cos_a, sin_a);
#else
  const double angle = static_cast<double>(position) * static_cast<double>(inv_freq);
  cos_a = static_cast<float>(std::cos(angle) * static_cast<double>(attention_scale));
  sin_a = static_cast<float>(std::sin(angle) * static_cast<double>(attention_scale));
#endif
}

/// Rotates one head vector in place to `position`.
/// \param x                [head_dim] floats; only x[0, rotary_dim) is touched, the rest passes
///                         through unchanged (partial rotary, e.g. GLM-4's head_dim/2).
/// \param position         token position, >= 0.
/// \param inv_freq         [rotary_dim/2] angular frequency of pair i (after any scaling).
/// \param rotary_dim       even, > 0.
/// \param interleaved      false: pair i is (x[i], x[i + rotary_dim/2]) (Llama/Qwen, HF
///                         `rotate_half`); true: pair i is (x[2i], x[2i+1]) (GLM-4).
/// \param attention_scale  multiplies the rotated values (YaRN's mscale; 1 otherwise).
SHADOWKV_HOST_DEVICE void apply_rope(float* x, long long position, const float* inv_freq,
                                     int rotary_dim, bool interleaved, float attention_scale) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    float cos_a = 0.0f;
    float sin_a = 0.0f;
    rope_cos_sin(position, inv_freq[i], attention_scale, cos_a, sin_a);
    const int i0 = interleaved ? 2 * i : i;
    const int i1 = interleaved ? 2 * i + 1 : i + half;
    rotate_pair(x[i0], x[i1], cos_a, sin_a);
  }
}

}  // namespace shadowkv::device
