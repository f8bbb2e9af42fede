#pragma once
/// \file cuda/kernels/cluster.cuh
/// \brief Thread-block cluster helpers (sm_90 and newer; a cluster of one CTA below): this
/// CTA's rank, cluster barriers, and the address of a variable in another CTA's shared memory.
/// Used by the top-k kernel, whose rows a cluster may share, and by the tensor-core decode
/// attention, whose splits of a row merge in their cluster.

namespace shadowkv::cuda::kernels {

/// This CTA's place in its thread-block cluster (size 1, rank 0 without a cluster launch or
/// below sm_90).
struct ClusterRank {
  int rank = 0;
  int size = 1;
};
__device__ __forceinline__ ClusterRank cluster_rank() {
  ClusterRank r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned rank = 0, size = 1;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
  r.rank = static_cast<int>(rank);
  r.size = static_cast<int>(size);
#endif
  return r;
}
/// A barrier over the cluster's threads with release/acquire ordering of shared memory
/// (`__syncthreads` where there is no cluster).
__device__ __forceinline__ void cluster_sync(const ClusterRank& cr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cr.size > 1) {
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    return;
  }
#endif
  (void)cr;
  __syncthreads();
}
/// `cluster_sync` in two halves, for a CTA that must not exit while others may still read its
/// shared memory: `cluster_arrive` once this CTA's own remote reads are done (release: they
/// are performed before the arrival is seen), `cluster_wait` before it exits. No-ops without a
/// cluster.
__device__ __forceinline__ void cluster_arrive(const ClusterRank& cr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cr.size > 1) asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
  (void)cr;
}
__device__ __forceinline__ void cluster_wait(const ClusterRank& cr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cr.size > 1) asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
  (void)cr;
}
/// The address of `p` (this CTA's shared memory) in the shared memory of cluster CTA `rank`.
template <class U>
__device__ __forceinline__ const U* cluster_shared(const U* p, int rank, const ClusterRank& cr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cr.size > 1) {
    const void* q = nullptr;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(q) : "l"(p), "r"(rank));
    return static_cast<const U*>(q);
  }
#endif
  (void)rank;
  (void)cr;
  return p;
}

}  // namespace shadowkv::cuda::kernels
