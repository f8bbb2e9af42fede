#pragma once
// Shared by the GPU benchmarks: a CUDA event pair timing work on one stream.

#include <cuda_runtime.h>

#include <shadowkv/cuda/error.cuh>

namespace shadowkv_bench {

/// RAII CUDA event pair: time on the stream between construction and `seconds()` / `ms()`.
class EventTimer {
 public:
  explicit EventTimer(cudaStream_t s) : stream_(s) {
    SHADOWKV_CUDA_CHECK(cudaEventCreate(&start_));
    SHADOWKV_CUDA_CHECK(cudaEventCreate(&stop_));
    SHADOWKV_CUDA_CHECK(cudaEventRecord(start_, stream_));
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  /// Records the stop event, waits for it, returns the elapsed milliseconds.
  double ms() {
    SHADOWKV_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(stop_));
    float t = 0;
    SHADOWKV_CUDA_CHECK(cudaEventElapsedTime(&t, start_, stop_));
    return t;
  }
  double seconds() { return ms() / 1e3; }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace shadowkv_bench
