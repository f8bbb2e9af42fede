// A user kernel calling shadowkv's device functions: the installed headers compile with nvcc
// against shadowkv::cuda. Built by the package test, not run (there may be no GPU).

#include <cstdio>

#include <shadowkv/cuda/error.cuh>
#include <shadowkv/device/rope.hpp>
#include <shadowkv/device/softmax.hpp>

/// Rotates each query head `q` [num_heads, head_dim] to `position`, then merges one softmax
/// partial `(m_b, l_b, o_b)` [num_heads, head_dim] into `(m_a, l_a, o_a)` per head.
__global__ void rope_and_merge(float* q, long long position, const float* inv_freq, int head_dim,
                               float* m_a, float* l_a, float* o_a, const float* m_b,
                               const float* l_b, const float* o_b, int num_heads) {
  const int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h >= num_heads) return;
  shadowkv::device::apply_rope(q + h * head_dim, position, inv_freq, head_dim,
                               /*interleaved=*/false, /*attention_scale=*/1.0f);
  shadowkv::device::SoftmaxState a{m_a[h], l_a[h]};
  const shadowkv::device::SoftmaxState b{m_b[h], l_b[h]};
  shadowkv::device::merge_partial(a, o_a + h * head_dim, b, o_b + h * head_dim, head_dim);
  m_a[h] = a.m;
  l_a[h] = a.l;
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::puts("consumer_cuda: no CUDA device; the kernel was compiled, not run");
    return 0;
  }
  try {
    cudaFuncAttributes attributes{};
    SHADOWKV_CUDA_CHECK(cudaFuncGetAttributes(&attributes, rope_and_merge));
    std::printf("consumer_cuda: rope_and_merge uses %d registers\n", attributes.numRegs);
  } catch (const shadowkv::Error& e) {
    std::puts(e.what());
    return 1;
  }
  return 0;
}
