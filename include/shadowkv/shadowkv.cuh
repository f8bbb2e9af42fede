#pragma once
/// \file shadowkv.cuh
/// \brief Umbrella header for CUDA users: everything in shadowkv.hpp plus the CUDA backend.

#include "shadowkv.hpp"
#include "cuda/dispatch.cuh"
#include "cuda/error.cuh"
#include "cuda/memory.cuh"
#include "cuda/types.cuh"
#include "cuda/decode_attention.cuh"
#include "cuda/miss_ops.cuh"
#include "cuda/landmark_ops.cuh"
#include "cuda/slot_table.cuh"
#include "cuda/offloaded_value_pool.cuh"
#include "cuda/landmark_index.cuh"
#include "cuda/library_handles.cuh"
#include "cuda/low_rank_key_store.cuh"
#include "cuda/sparse_attention.cuh"
