// A libFuzzer entry point; CMake builds it once per target with SHADOWKV_FUZZ_TARGET set to the
// target's function in fuzz_targets.hpp (safetensors, config_json, tokenizer_json).

#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  (void)skv_fuzz::SHADOWKV_FUZZ_TARGET(data, size);
  return 0;
}
