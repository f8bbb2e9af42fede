#pragma once
/// \file shadowkv.cuh
/// \brief Umbrella header for CUDA users (compile with nvcc, link `shadowkv::cuda`): everything
/// `shadowkv.hpp` has, plus the CUDA backend.

#include "shadowkv.hpp"

#include "cuda/error.cuh"
