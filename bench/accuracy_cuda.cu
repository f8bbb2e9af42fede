// The accuracy harness's GPU glue (nvcc, when the build has CUDA): `Decoder<Policy,
// CudaBackend>` for every configuration, all attention work of a prompt on the dense decoder's
// stream (accuracy_run.hpp), device views copied back for the attention-level figures.

#include <cuda_runtime_api.h>

#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include <shadowkv/cuda/error.cuh>
#include <shadowkv/model/decoder_cuda.cuh>

#include "accuracy_run.hpp"

namespace shadowkv_bench::accuracy {

namespace {

struct CudaIo {
  // Plain cudaMalloc/cudaFree: the buffer outlives the decoders and their streams (freeing a
  // stream-ordered allocation on a destroyed stream crashed the first GPU run at exit).
  struct Free {
    void operator()(float* p) const { (void)cudaFree(p); }
  };
  std::unique_ptr<float, Free> scratch_;
  std::size_t scratch_size_ = 0;
  std::vector<float> host(TensorView<const float, 3> v, const std::tuple<cudaStream_t>& a) {
    std::vector<float> out(static_cast<std::size_t>(v.numel()));
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(out.data(), v.data, out.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                        std::get<0>(a)));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(std::get<0>(a)));
    return out;
  }
  TensorView<float, 3> scratch(index_t n, index_t h, index_t d, const std::tuple<cudaStream_t>& a) {
    const std::size_t size = static_cast<std::size_t>(n * h * d);
    if (scratch_size_ < size) {
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(std::get<0>(a)));  // the old buffer's readers are done
      scratch_.reset();
      float* p = nullptr;
      SHADOWKV_CUDA_CHECK(cudaMalloc(&p, size * sizeof(float)));
      scratch_.reset(p);
      scratch_size_ = size;
    }
    return TensorView<float, 3>(scratch_.get(), {n, h, d});
  }
  void sync(const std::tuple<cudaStream_t>& a) { SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(std::get<0>(a))); }
};

}  // namespace

void run_cuda(const Options& o, const ModelConfig& cfg, const WeightStore& store, const RetrievalTasks& tasks,
              nlohmann::json& result, std::string& device_name, const std::function<void()>& checkpoint) {
  int dev = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  SHADOWKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  device_name = prop.name;
  CudaIo io;
  run<CudaBackend>(o, cfg, store, tasks, io, result, checkpoint);
}

int cuda_devices(std::string& why) { return shadowkv::cuda::visible_devices(why); }

}  // namespace shadowkv_bench::accuracy
