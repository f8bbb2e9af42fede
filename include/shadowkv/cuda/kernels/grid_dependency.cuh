#pragma once
/// \file cuda/kernels/grid_dependency.cuh
/// \brief Programmatic dependent launch (sm_90 and newer), device side: a kernel started with
/// `launch_kernel` (cuda/launch.cuh) may be resident
/// while the kernel before it on the stream still runs, and must call
/// `wait_for_previous_grids` before its first access to global memory that an earlier launch
/// could touch; `allow_next_grid` lets the following launch start early. Both are no-ops below
/// sm_90 and in a kernel launched the ordinary way, so a kernel that calls them can be
/// launched either way.

namespace shadowkv::cuda::kernels {

/// Blocks until every grid this one depends on has completed and its memory operations are
/// visible (griddepcontrol.wait).
__device__ __forceinline__ void wait_for_previous_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Lets a launch that follows this grid with a programmatic dependency start once every CTA of
/// this grid has called it or exited (griddepcontrol.launch_dependents). It orders nothing: the
/// follower still waits for this grid's completion in `wait_for_previous_grids`. Called at the
/// top of a kernel, it lets the follower's CTAs take SMs as this grid's last CTAs retire.
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace shadowkv::cuda::kernels
