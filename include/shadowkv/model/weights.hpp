#pragma once
/// \file model/weights.hpp
/// \brief A checkpoint (`WeightStore`) read through a `ModelConfig`: every weight the config
/// implies checked for presence, dtype and shape up front, and one weight (or one part of a
/// fused tensor) converted into a caller's buffer.

#include <span>
#include <string>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "model_config.hpp"
#include "safetensors.hpp"

namespace shadowkv::model {

/// Throws naming the shard and the tensor unless tensor `w.tensor` exists in `store`, has a
/// dtype the library converts (BF16, F16, F32) and exactly the shape `w.tensor_shape` that
/// `cfg` implies (the message shows the expected shape in config terms and names config.json).
inline void check_weight(const WeightStore& store, const ModelConfig& cfg, const WeightRef& w) {
  const SafetensorsFile& file = store.file_of(w.tensor);
  const TensorInfo& t = file.info(w.tensor);
  SHADOWKV_CHECK(to_storage_dtype(t.dtype).has_value(), file.path().string(), ": tensor '", w.tensor,
                 "' has dtype ", to_string(t.dtype), "; model weights must be BF16, F16 or F32");
  SHADOWKV_CHECK(t.shape == w.tensor_shape, file.path().string(), ": tensor '", w.tensor, "' has shape ",
                 shape_string(t.shape), ", but ", cfg.source, " implies ", w.shape_names, " = ",
                 shape_string(w.tensor_shape));
}

/// Checks every weight of every layer, the embedding, the final norm and the LM head
/// (`check_weight` for each) before anything is loaded, so a bad checkpoint fails at once
/// with the first offending tensor named.
inline void check_weights(const WeightStore& store, const ModelConfig& cfg) {
  for (const WeightRef& w : model_weights(cfg).all()) check_weight(store, cfg, w);
  for (int layer = 0; layer < cfg.num_layers; ++layer)
    for (const WeightRef& w : layer_weights(cfg, layer).all()) check_weight(store, cfg, w);
}

/// Converts weight `w` (a whole tensor, or its rows of a fused one) into `out`, which must hold
/// `w.numel()` elements, row-major in `w.shape`. The tensor's own shape is checked against
/// `w.tensor_shape` first.
template <StorageType T>
void load_weight(const WeightStore& store, const WeightRef& w, std::span<T> out) {
  SHADOWKV_CHECK(!w.empty(), "load_weight: the weight reference is empty (the model has no such weight)");
  const SafetensorsFile& file = store.file_of(w.tensor);
  const TensorInfo& t = file.info(w.tensor);
  SHADOWKV_CHECK(t.shape == w.tensor_shape, file.path().string(), ": tensor '", w.tensor, "' has shape ",
                 shape_string(t.shape), ", expected ", w.shape_names, " = ", shape_string(w.tensor_shape));
  SHADOWKV_CHECK(static_cast<index_t>(out.size()) == w.numel(), "load_weight: out holds ", out.size(),
                 " elements, weight '", w.tensor, "' (shape ", shape_string(w.shape), " from row ", w.row_begin,
                 ") holds ", w.numel());
  if (w.is_slice() && !w.shape.empty())
    file.read_rows(w.tensor, w.row_begin, w.shape[0], out);
  else
    file.read(w.tensor, out);
}

/// `load_weight` into a new vector.
template <StorageType T>
std::vector<T> load_weight(const WeightStore& store, const WeightRef& w) {
  std::vector<T> out(static_cast<std::size_t>(w.numel()));
  load_weight<T>(store, w, std::span<T>(out));
  return out;
}

}  // namespace shadowkv::model
