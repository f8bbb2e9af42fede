// shadowkv-decode's GPU half, compiled by nvcc when the build has CUDA: `Decoder<Policy,
// CudaBackend>` (model/decoder_cuda.cuh: float weights on the device, cuBLAS GEMMs, attention
// through the CUDA SparseAttention on one stream) behind the same run as the CPU
// (decode_run.hpp). The command line itself stays in shadowkv_decode.cpp (host compiler).

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include <shadowkv/cuda/error.cuh>
#include <shadowkv/model/decoder_cuda.cuh>

#include "decode_run.hpp"

namespace shadowkv_examples::decode {

int run_cuda(const Options& o, const fs::path& dir, const ModelConfig& cfg, const WeightStore& store,
             const Tokenizer& tok, const std::vector<token_id>& prompt) {
  return run_policy<CudaBackend>(o, dir, cfg, store, tok, prompt);
}

int cuda_device_count(std::string& why) { return shadowkv::cuda::visible_devices(why); }

}  // namespace shadowkv_examples::decode
