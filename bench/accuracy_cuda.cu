// The accuracy harness's GPU glue (nvcc, when the build has CUDA): `Decoder<Policy,
// CudaBackend>` for every configuration, all attention work of a prompt on the dense decoder's
// stream (accuracy_run.hpp), device views copied back for the attention-level figures.

#include <cuda_runtime_api.h>

#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include <shadowkv/cuda/error.cuh>
#include <shadowkv/cuda/memory.cuh>
#include <shadowkv/model/decoder_cuda.cuh>

#include "accuracy_run.hpp"

namespace shadowkv_bench::accuracy {

namespace {

struct CudaIo {
  shadowkv::cuda::DeviceBuffer<float> scratch_;
  std::vector<float> host(TensorView<const float, 3> v, const std::tuple<cudaStream_t>& a) {
    std::vector<float> out(static_cast<std::size_t>(v.numel()));
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(out.data(), v.data, out.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                        std::get<0>(a)));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(std::get<0>(a)));
    return out;
  }
  TensorView<float, 3> scratch(index_t n, index_t h, index_t d, const std::tuple<cudaStream_t>& a) {
    const std::size_t size = static_cast<std::size_t>(n * h * d);
    if (scratch_.size() < size) scratch_ = shadowkv::cuda::DeviceBuffer<float>(size, std::get<0>(a));
    return TensorView<float, 3>(scratch_.data(), {n, h, d});
  }
  void sync(const std::tuple<cudaStream_t>& a) { SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(std::get<0>(a))); }
};

}  // namespace

void run_cuda(const Options& o, const ModelConfig& cfg, const WeightStore& store, const RetrievalTasks& tasks,
              nlohmann::json& result, std::string& device_name) {
  int dev = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  SHADOWKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  device_name = prop.name;
  CudaIo io;
  run<CudaBackend>(o, cfg, store, tasks, io, result);
}

int cuda_devices(std::string& why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    why = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
    return 0;
  }
  if (count == 0) why = "cudaGetDeviceCount reported 0 devices";
  return count;
}

}  // namespace shadowkv_bench::accuracy
