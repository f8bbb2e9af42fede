#pragma once
/// \file softmax.hpp
/// \brief Online-softmax state and its merge, shared by the CPU backend and CUDA kernels.
///
/// A partial attention result over a set of tokens is (m, l, o): the running maximum logit,
/// the sum of exp(logit - m), and the unnormalised output sum_i exp(logit_i - m) * v_i.
/// Two partials over disjoint token sets merge exactly, so a softmax can be split over
/// segments (static set, selected chunks, generated tokens) or over thread blocks.

#include <cmath>

#include "../core/macros.hpp"

namespace shadowkv::device {

struct SoftmaxState {
  float m;  ///< running max logit (-inf when empty)
  float l;  ///< sum of exp(logit - m)
};

SHADOWKV_HOST_DEVICE SoftmaxState empty_softmax_state() { return {-INFINITY, 0.0f}; }

/// Merges `b` into `a`; `out_a[0..n)` and `out_b[0..n)` are the unnormalised outputs.
/// Returns the rescale factors through `scale_a`/`scale_b` so that the merged output is
/// `out_a * scale_a + out_b * scale_b`.
SHADOWKV_HOST_DEVICE SoftmaxState merge_softmax_state(SoftmaxState a, SoftmaxState b,
                                                      float& scale_a, float& scale_b) {
  if (b.m == -INFINITY) {
    scale_a = 1.0f;
    scale_b = 0.0f;
    return a;
  }
  if (a.m == -INFINITY) {
    scale_a = 0.0f;
    scale_b = 1.0f;
    return b;
  }
  const float m = a.m > b.m ? a.m : b.m;
  scale_a = expf(a.m - m);
  scale_b = expf(b.m - m);
  return {m, a.l * scale_a + b.l * scale_b};
}

/// Merges partial `(b, out_b)` into `(a, out_a)` in place over `n` output elements.
SHADOWKV_HOST_DEVICE void merge_partial(SoftmaxState& a, float* out_a, SoftmaxState b,
                                        const float* out_b, int n) {
  float sa, sb;
  a = merge_softmax_state(a, b, sa, sb);
  for (int i = 0; i < n; ++i) out_a[i] = out_a[i] * sa + out_b[i] * sb;
}

}  // namespace shadowkv::device
