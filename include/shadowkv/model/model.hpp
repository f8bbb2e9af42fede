#pragma once
/// \file model/model.hpp
/// \brief Umbrella header of what the example decoders share: safetensors checkpoints,
/// config.json, the weight naming of each architecture, tokenizers. Needs nlohmann-json
/// (CMake target `shadowkv::model`).

#include "json_reader.hpp"
#include "model_config.hpp"
#include "safetensors.hpp"
#include "tokenizer.hpp"
#include "unicode.hpp"
#include "weights.hpp"
