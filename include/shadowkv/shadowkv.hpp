#pragma once
/// \file shadowkv.hpp
/// \brief Umbrella header for host-only users: the core types and the CPU (Eigen) backend.

#include "core/backend.hpp"
#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/memory_plan.hpp"
#include "core/policy.hpp"
#include "core/rope.hpp"
#include "core/stats.hpp"
#include "core/tensor.hpp"
#include "cpu/landmark_index.hpp"
#include "cpu/low_rank_key_store.hpp"
#include "cpu/offloaded_value_pool.hpp"
#include "cpu/sparse_attention.hpp"
#include "device/rope.hpp"
#include "device/softmax.hpp"
