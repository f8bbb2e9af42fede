// End-to-end decode throughput of a Llama-3.1-8B-shaped model on one GPU (issue 5): tokens/s of
// greedy decoding with attention through SparseAttention<ShadowKVPolicy> or <DensePolicy>, at
// the largest batch the memory planner allows and at smaller ones. See `throughput --help` and
// docs/benchmarks.md ("Throughput harness").
//
// The model: 32 layers, hidden 4096, 32 q / 8 KV heads of 128, SwiGLU MLP 14336, RMSNorm,
// RoPE with Llama-3.1 scaling (inside SparseAttention), LM head 128256, random bf16 weights made
// on the device (their values do not change the speed; they are scaled by 1/sqrt(fan-in) so the
// hidden state stays finite over 32 layers and the top-k never sees NaN). Linear layers are
// cuBLAS GemmEx (bf16 in, fp32 compute); RMSNorm (fused with the residual add), SwiGLU, the
// q/k/v split, the embedding lookup and the argmax of the logits are small kernels here. A step
// is: embed the B current tokens -> 32 x (add+norm, QKV GEMM, attention decode, O GEMM,
// add+norm, gate/up GEMM, SwiGLU, down GEMM) -> add+norm -> LM head GEMM -> argmax -> the next
// tokens, all on one stream with no host synchronisation.
//
// Prefill is synthetic: random pre-RoPE keys and values generated on the device per (sequence,
// layer, chunk), fed through SparseAttention::prefill + finish_prefill (the real build path:
// Gram + eigensolve, A, landmarks, outliers, value offload for ShadowKV).

#include <cub/block/block_scan.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "event_timer.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;  // libcu++ (pulled in by CUB) has a global ::cuda too

namespace {

using D = __nv_bfloat16;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// Model shapes
// ---------------------------------------------------------------------------------------------

/// Llama-3.1-8B shapes (layers from the command line).
struct ModelShape {
  int layers = 32;
  int hidden = 4096;
  int q_heads = 32, kv_heads = 8, head_dim = 128;
  int intermediate = 14336;
  int vocab = 128256;
  float rms_eps = 1e-5f;
  int q_dim() const { return q_heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  /// Elements of one layer's linear weights.
  std::size_t layer_linear_elems() const {
    const std::size_t h = hidden;
    return static_cast<std::size_t>(qkv_dim()) * h + h * q_dim() + 2 * h * intermediate +
           h * static_cast<std::size_t>(intermediate);
  }
  /// Bytes of the whole model's weights (bf16), as a real checkpoint holds them.
  std::size_t weight_bytes() const {
    return 2 * (layers * (layer_linear_elems() + 2 * static_cast<std::size_t>(hidden)) +
                2 * static_cast<std::size_t>(vocab) * hidden + hidden);
  }
};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float hash_uniform(std::size_t i, unsigned seed) {
  unsigned x = static_cast<unsigned>(i) * 2654435761u ^ static_cast<unsigned>(i >> 32) * 0x27d4eb2fu ^ seed;
  x ^= x >> 13;
  x *= 0x5bd1e995u;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return static_cast<float>(x >> 8) * (1.0f / 8388608.0f) - 1.0f;  // [-1, 1)
}

/// `p[i] = center + half_width * u`, u uniform in [-1, 1).
/// Mixes a few integers into 32 random bits (a murmur-style finaliser).
__device__ __forceinline__ unsigned mix_bits(unsigned a, unsigned b, unsigned c, unsigned d) {
  unsigned x = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u ^ (c + 0x165667B1u) * 0xC2B2AE3Du ^ d * 0x27D4EB2Fu;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

constexpr int kReplayThreads = 256;

/// The what-if selection trace (issue 5): one CTA per (sequence b, KV head h) of one layer
/// rewrites the top-k's selection so that exactly round(reuse·k) of its k chunks are chunks the
/// previous step selected for (b, layer, h) — a random subset of them — and the rest are random
/// chunks the previous step did not select; the first step keeps the top-k's own selection.
/// `prev` `[batch, layers, H_kv, k]` holds each (b, layer, h)'s last selection (-1: none yet).
/// The row is written ascending (the selection's usual order). Rows with fewer landmarks than k
/// are left alone. Dynamic shared memory: two bitmaps of ceil(max_landmarks / 32) words.
/// `salt` differs between runs: without it a run's draws repeated the previous run's step for
/// step, which had left exactly those chunks in a large value cache (99.7% hits at 60% reuse).
__global__ void replay_selection_kernel(std::int32_t* selected, const int* num_landmarks, std::int32_t* prev,
                                        int layers, int layer, int num_kv_heads, int k, float reuse, unsigned step,
                                        unsigned salt, int bitmap_words) {
  using Scan = cub::BlockScan<int, kReplayThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  extern __shared__ unsigned replay_bitmaps[];
  unsigned* taken = replay_bitmaps;                  // the previous selection, then the draws
  unsigned* chosen = replay_bitmaps + bitmap_words;  // the new selection
  const int h = blockIdx.x, b = blockIdx.y;
  const unsigned row_seed = (b * 131071u + h) ^ salt;  // this (b, h) in this run
  const int m = num_landmarks[b];
  if (m < k || (m + 31) / 32 > bitmap_words) return;
  std::int32_t* sel = selected + (static_cast<long long>(b) * num_kv_heads + h) * k;
  std::int32_t* pv = prev + ((static_cast<long long>(b) * layers + layer) * num_kv_heads + h) * k;
  const bool first = pv[0] < 0;
  __syncthreads();
  if (first) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) pv[i] = sel[i];
    return;
  }
  const int words = (m + 31) / 32;
  for (int w = threadIdx.x; w < words; w += blockDim.x) taken[w] = chosen[w] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x) atomicOr(&taken[pv[i] >> 5], 1u << (pv[i] & 31));
  // Keep the `keep` previous entries with the smallest random keys.
  // (At least 2k - m are kept: there are only m - k chunks the previous step did not select.)
  const int keep = max(2 * k - m, min(k, static_cast<int>(lrintf(reuse * static_cast<float>(k)))));
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const unsigned key = mix_bits(step, row_seed, 0x5eedu, static_cast<unsigned>(i));
    int rank = 0;
    for (int j = 0; j < k; ++j) {
      const unsigned other = mix_bits(step, row_seed, 0x5eedu, static_cast<unsigned>(j));
      rank += other < key || (other == key && j < i);
    }
    if (rank < keep) atomicOr(&chosen[pv[i] >> 5], 1u << (pv[i] & 31));
  }
  __syncthreads();
  // Draw k - keep chunks the previous step did not select (rejection; the density is k / m).
  for (int i = keep + threadIdx.x; i < k; i += blockDim.x) {
    for (unsigned attempt = 0;; ++attempt) {
      const int c = static_cast<int>(mix_bits(step, row_seed, static_cast<unsigned>(i), attempt) % m);
      const unsigned bit = 1u << (c & 31);
      if (!(atomicOr(&taken[c >> 5], bit) & bit)) {
        atomicOr(&chosen[c >> 5], bit);
        break;
      }
    }
  }
  __syncthreads();
  // Write the chosen set ascending: each thread owns a run of words, a block scan of their counts.
  const int per = (words + kReplayThreads - 1) / kReplayThreads;
  const int w0 = min(words, static_cast<int>(threadIdx.x) * per), w1 = min(words, w0 + per);
  int count = 0;
  for (int w = w0; w < w1; ++w) count += __popc(chosen[w]);
  int offset = 0;
  Scan(scan_storage).ExclusiveSum(count, offset);
  for (int w = w0; w < w1; ++w)
    for (unsigned bits = chosen[w]; bits; bits &= bits - 1) {
      const int c = w * 32 + __ffs(static_cast<int>(bits)) - 1;
      sel[offset] = c;
      pv[offset] = c;
      ++offset;
    }
}

__global__ void fill_uniform_kernel(D* p, std::size_t n, unsigned seed, float center, float half_width) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(center + half_width * hash_uniform(i, seed));
}

void fill_uniform(D* p, std::size_t n, unsigned seed, float center, float half_width, cudaStream_t stream) {
  if (n == 0) return;
  fill_uniform_kernel<<<2048, 256, 0, stream>>>(p, n, seed, center, half_width);
  SHADOWKV_CUDA_CHECK_LAUNCH();
}

/// x[b, :] = float(table[tokens[b], :]).   grid B, block 256.
__global__ void embed_kernel(const std::int32_t* tokens, const D* table, int hidden, float* x) {
  const std::size_t row = static_cast<std::size_t>(tokens[blockIdx.x]) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    x[static_cast<std::size_t>(blockIdx.x) * hidden + i] = __bfloat162float(table[row + i]);
}

/// The residual add fused with RMSNorm: x += h (when h is given), out = x / rms(x) * w.
/// x: fp32 residual stream [B, hidden]; h, out: bf16 [B, hidden].   grid B, block 256.
__global__ void add_rmsnorm_kernel(float* x, const D* h, const D* w, D* out, int hidden, float eps) {
  __shared__ float partial[32];
  float* xr = x + static_cast<std::size_t>(blockIdx.x) * hidden;
  const D* hr = h ? h + static_cast<std::size_t>(blockIdx.x) * hidden : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = xr[i];
    if (hr) {
      v += __bfloat162float(hr[i]);
      xr[i] = v;
    }
    ss += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) partial[0] = v;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / hidden + eps);
  D* outr = out + static_cast<std::size_t>(blockIdx.x) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) outr[i] = __float2bfloat16(xr[i] * inv * __bfloat162float(w[i]));
}

/// The fused QKV projection [B, q_dim + 2 kv_dim] split into contiguous q [B, q_dim], k, v
/// [B, kv_dim] (SparseAttention::decode takes contiguous views).
__global__ void split_qkv_kernel(const D* qkv, int b, int q_dim, int kv_dim, D* q, D* k, D* v) {
  const int row = q_dim + 2 * kv_dim;
  const long long total = static_cast<long long>(b) * row;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long t = i / row;
    const int c = static_cast<int>(i - t * row);
    if (c < q_dim) q[t * q_dim + c] = qkv[i];
    else if (c < q_dim + kv_dim) k[t * kv_dim + c - q_dim] = qkv[i];
    else v[t * kv_dim + c - q_dim - kv_dim] = qkv[i];
  }
}

/// a[b, i] = silu(gu[b, i]) * gu[b, I + i] over the fused gate|up projection [B, 2I].
__global__ void swiglu_kernel(const D* gu, int b, int inter, D* a) {
  const long long total = static_cast<long long>(b) * inter;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long t = i / inter;
    const long long c = i - t * inter;
    const float g = __bfloat162float(gu[t * 2 * inter + c]);
    const float u = __bfloat162float(gu[t * 2 * inter + inter + c]);
    a[i] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
  }
}

/// tokens[b] = argmax_j logits[b, j] (ties to the lower index, NaN never wins).  grid B, 1024.
__global__ void argmax_kernel(const float* logits, int vocab, std::int32_t* tokens) {
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  const float* row = logits + static_cast<std::size_t>(blockIdx.x) * vocab;
  float bv = -INFINITY;
  int bi = vocab;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = row[j];
    if (v > bv) {  // strided ascending j: a later equal value never replaces an earlier one
      bv = v;
      bi = j;
    }
  }
  auto better = [](float v, int i, float ov, int oi) { return ov > v || (ov == v && oi < i); };
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(bv, bi, ov, oi)) {
      bv = ov;
      bi = oi;
    }
  }
  if ((threadIdx.x & 31) == 0) {
    best_v[threadIdx.x >> 5] = bv;
    best_i[threadIdx.x >> 5] = bi;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const bool live = threadIdx.x < (blockDim.x >> 5);
    bv = live ? best_v[threadIdx.x] : -INFINITY;
    bi = live ? best_i[threadIdx.x] : vocab;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(bv, bi, ov, oi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (threadIdx.x == 0) tokens[blockIdx.x] = bi < vocab ? bi : 0;  // all NaN: token 0
  }
}

// ---------------------------------------------------------------------------------------------
// cuBLAS
// ---------------------------------------------------------------------------------------------

/// Y[M, N] = X[M, K] · W[N, K]ᵀ, row-major (PyTorch's Linear layout), bf16 in, fp32 compute;
/// Y is bf16 or fp32 (`y_type`).
void linear(cublasHandle_t handle, cudaStream_t stream, const D* x, const D* w, void* y, cudaDataType_t y_type,
            int m, int n, int k) {
  const float alpha = 1.f, beta = 0.f;
  SHADOWKV_CUBLAS_CHECK(cublasSetStream(handle, stream));
  // Column-major view: Yᵀ[N, M] = W[N, K] (stored as Wᵀ col-major, ld K) · Xᵀ[K, M] (ld K).
  SHADOWKV_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, x,
                                     CUDA_R_16BF, k, &beta, y, y_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Options {
  bool quick = false;
  int layers = 32;
  std::vector<long long> contexts{32768, 65536, 131072, 262144};
  std::vector<std::string> policies{"dense", "shadowkv"};
  std::vector<std::string> value_cache{"0", "auto"};
  std::vector<int> batches;  // explicit; empty: the planner's
  std::vector<double> batch_fractions{1.0, 0.5, 0.25};
  std::vector<double> what_if{0.0, 0.6, 0.8};  // replayed reuse fractions, at the largest batch
  int max_batch = 0;
  int warmup = 5;
  int steps = 20;
  bool fill_cache = true;  // untimed steps that fill a value cache larger than the budget first
  double device_gib = 139.8;
  double host_gib = 125.0;
  double reserve_gib = 3.0;
  double host_reserve_gib = 6.0;
  long long prefill_chunk = 16384;
  bool single_object = false;
  bool shared_weights = false;
  long long prefill_overhead_context = 65536;
  std::string json;
  unsigned seed = 1;
  std::string command;
  int activation_batch = 0;  // set by run(): the largest batch the activations hold
};

/// A value-cache setting: capacity in chunks per KV head, 0 = the budget, -1 = auto.
int parse_value_cache(const std::string& s) {
  if (s == "auto") return -1;
  std::size_t used = 0;
  int v = -2;
  try {
    v = std::stoi(s, &used);
  } catch (...) {
  }
  if (used != s.size() || v < 0) throw CLI::ValidationError("--value-cache-chunks", "'" + s + "' is neither 'auto' nor a chunk count >= 0");
  return v;
}

// ---------------------------------------------------------------------------------------------
// Timing, memory, output
// ---------------------------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;
const Clock::time_point g_start = Clock::now();
double elapsed_s() { return std::chrono::duration<double>(Clock::now() - g_start).count(); }

template <class... A>
void progress(const char* fmt, A... a) {
  std::printf("[%7.1f s] ", elapsed_s());
  std::printf(fmt, a...);
  std::printf("\n");
  std::fflush(stdout);
}

using shadowkv_bench::EventTimer;

/// MemAvailable from /proc/meminfo (bytes), or 0 when unreadable.
std::size_t host_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  std::size_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return 0;
}

std::pair<std::size_t, std::size_t> device_free_total() {
  std::size_t free = 0, total = 0;
  SHADOWKV_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return {free, total};
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\', o += c;
    else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      o += buf;
    } else o += c;
  }
  return o;
}

std::string num_or_null(double v, bool valid, int precision = 6) {
  if (!valid || !std::isfinite(v)) return "null";
  std::ostringstream os;
  os.precision(precision);
  os << v;
  return os.str();
}

/// One measured configuration.
struct Row {
  std::string policy;      // "dense" | "shadowkv"
  long long context = 0;
  int batch = 0;
  int planner_batch = 0;   // the largest batch the planner allowed for this configuration
  std::string value_cache_mode;  // "budget" | "auto" | "fixed" | "" (dense)
  int value_cache_chunks = 0;    // resolved capacity per KV head (ShadowKV)
  double tokens_per_s = 0, ms_per_step = 0;
  double hit_rate = 0;
  bool has_hit_rate = false;
  std::size_t device_bytes_per_seq = 0, host_bytes_per_seq = 0;  // memory(id) after the run
  std::size_t planned_device_bytes_per_seq = 0, planned_host_bytes_per_seq = 0;
  // What the batch took from the device (cudaMemGetInfo before and after prefilling it, the
  // staging pool trimmed), divided by the batch: the check of the planner's figure.
  std::size_t measured_device_bytes_per_seq = 0;
  double pcie_mb_per_step = 0, attention_hbm_mb_per_step = 0;
  double host_issue_ms_per_step = 0;  // host time spent enqueueing a step
  double attention_ms_per_step = 0;   // of one more step, events around each layer's attention
  int cache_fill_steps = 0;           // untimed steps that filled the value cache before the runs
  long long skipped = 0;              // StepStats::skipped over the timed steps (0 unless memory is corrupt)
  std::string mode = "seen";
};

struct PrefillOverhead {
  long long context = 0;
  int layers = 0;
  double shadowkv_ms = 0;       // prefill calls (staging + Gram) + finish_prefill, ShadowKV
  double shadowkv_finish_ms = 0;
  double staging_ms = 0;        // the same through DensePolicy: staging copies only
  double shadowkv_cold_ms = 0;  // the first build, which pins the host pool
  bool measured = false;
};

struct Report {
  std::string device, date, command;
  std::vector<Row> rows;
  PrefillOverhead prefill;
  std::size_t weight_bytes = 0;
};

void write_json(const Report& r, const std::string& path) {
  if (path.empty()) return;
  std::ofstream f(path);
  if (!f) {
    std::fprintf(stderr, "warning: cannot write --json %s\n", path.c_str());
    return;
  }
  f << "{\n  \"device\": \"" << json_escape(r.device) << "\",\n  \"date\": \"" << r.date << "\",\n  \"command\": \""
    << json_escape(r.command) << "\",\n  \"weight_bytes\": " << r.weight_bytes << ",\n";
  const PrefillOverhead& p = r.prefill;
  if (p.measured)
    f << "  \"prefill\": {\"context\": " << p.context << ", \"layers\": " << p.layers
      << ", \"shadowkv_build_ms\": " << num_or_null(p.shadowkv_ms, true)
      << ", \"shadowkv_finish_prefill_ms\": " << num_or_null(p.shadowkv_finish_ms, true)
      << ", \"staging_only_ms\": " << num_or_null(p.staging_ms, true)
      << ", \"shadowkv_build_cold_ms\": " << num_or_null(p.shadowkv_cold_ms, true) << "},\n";
  f << "  \"rows\": [\n";
  for (std::size_t i = 0; i < r.rows.size(); ++i) {
    const Row& w = r.rows[i];
    const bool sparse = w.policy != "dense";
    f << "    {\"policy\": \"" << w.policy << "\", \"context\": " << w.context << ", \"batch\": " << w.batch
      << ", \"planner_batch\": " << w.planner_batch << ", \"value_cache_chunks\": "
      << (sparse ? std::to_string(w.value_cache_chunks) : "null") << ", \"value_cache_mode\": "
      << (sparse ? "\"" + w.value_cache_mode + "\"" : "null") << ", \"tokens_per_s\": " << num_or_null(w.tokens_per_s, true)
      << ", \"ms_per_step\": " << num_or_null(w.ms_per_step, true)
      << ", \"hit_rate\": " << num_or_null(w.hit_rate, w.has_hit_rate)
      << ", \"device_bytes_per_seq\": " << w.device_bytes_per_seq << ", \"host_bytes_per_seq\": " << w.host_bytes_per_seq
      << ", \"planned_device_bytes_per_seq\": " << w.planned_device_bytes_per_seq
      << ", \"planned_host_bytes_per_seq\": " << w.planned_host_bytes_per_seq
      << ", \"measured_device_bytes_per_seq\": " << w.measured_device_bytes_per_seq
      << ", \"pcie_mb_per_step\": " << num_or_null(w.pcie_mb_per_step, true)
      << ", \"attention_hbm_mb_per_step\": " << num_or_null(w.attention_hbm_mb_per_step, true)
      << ", \"host_issue_ms_per_step\": " << num_or_null(w.host_issue_ms_per_step, true)
      << ", \"attention_ms_per_step\": " << num_or_null(w.attention_ms_per_step, true)
      << ", \"cache_fill_steps\": " << w.cache_fill_steps << ", \"skipped\": " << w.skipped << ", \"mode\": \""
      << w.mode << "\"}" << (i + 1 < r.rows.size() ? "," : "") << "\n";
  }
  f << "  ]\n}\n";
}

// ---------------------------------------------------------------------------------------------
// The model on the device
// ---------------------------------------------------------------------------------------------

struct LayerWeights {
  const D* qkv;   // [q_dim + 2 kv_dim, hidden]
  const D* o;     // [hidden, q_dim]
  const D* gate_up;  // [2 I, hidden]
  const D* down;  // [hidden, I]
  const D* attn_norm;
  const D* mlp_norm;
};

class Model {
 public:
  Model(const ModelShape& shape, bool shared, unsigned seed, cudaStream_t stream) : shape_(shape) {
    const std::size_t h = shape.hidden;
    const int sets = shared ? 1 : shape.layers;
    const std::size_t per_set = shape.layer_linear_elems() + 2 * h;
    storage_ = skc::DeviceBuffer<D>(per_set * sets + 2 * static_cast<std::size_t>(shape.vocab) * h + h, stream);
    D* p = storage_.data();
    auto take = [&](std::size_t n, float center, float half_width) {
      D* q = p;
      fill_uniform(q, n, seed++, center, half_width, stream);
      p += n;
      return q;
    };
    auto scale = [](std::size_t fan_in) { return static_cast<float>(std::sqrt(3.0 / static_cast<double>(fan_in))); };
    std::vector<LayerWeights> sets_w;
    for (int s = 0; s < sets; ++s) {
      LayerWeights w;
      w.qkv = take(static_cast<std::size_t>(shape.qkv_dim()) * h, 0.f, scale(h));
      w.o = take(h * shape.q_dim(), 0.f, scale(shape.q_dim()));
      w.gate_up = take(2 * h * shape.intermediate, 0.f, scale(h));
      w.down = take(h * shape.intermediate, 0.f, scale(shape.intermediate));
      w.attn_norm = take(h, 1.f, 0.1f);
      w.mlp_norm = take(h, 1.f, 0.1f);
      sets_w.push_back(w);
    }
    for (int l = 0; l < shape.layers; ++l) layers_.push_back(sets_w[shared ? 0 : l]);
    embedding_ = take(static_cast<std::size_t>(shape.vocab) * h, 0.f, 1.f);
    lm_head_ = take(static_cast<std::size_t>(shape.vocab) * h, 0.f, scale(h));
    final_norm_ = take(h, 1.f, 0.1f);
  }
  const ModelShape& shape() const { return shape_; }
  const LayerWeights& layer(int l) const { return layers_[l]; }
  const D* embedding() const { return embedding_; }
  const D* lm_head() const { return lm_head_; }
  const D* final_norm() const { return final_norm_; }
  std::size_t allocated_bytes() const { return storage_.bytes(); }

 private:
  ModelShape shape_;
  skc::DeviceBuffer<D> storage_;
  std::vector<LayerWeights> layers_;
  const D* embedding_ = nullptr;
  const D* lm_head_ = nullptr;
  const D* final_norm_ = nullptr;
};

/// Per-step activations for up to `max_batch` sequences.
struct Activations {
  skc::DeviceBuffer<float> x, logits;
  skc::DeviceBuffer<D> xn, qkv, q, k, v, attn, h, gu, act;
  skc::DeviceBuffer<std::int32_t> tokens;
  Activations(const ModelShape& s, int b, cudaStream_t stream)
      : x(static_cast<std::size_t>(b) * s.hidden, stream),
        logits(static_cast<std::size_t>(b) * s.vocab, stream),
        xn(static_cast<std::size_t>(b) * s.hidden, stream),
        qkv(static_cast<std::size_t>(b) * s.qkv_dim(), stream),
        q(static_cast<std::size_t>(b) * s.q_dim(), stream),
        k(static_cast<std::size_t>(b) * s.kv_dim(), stream),
        v(static_cast<std::size_t>(b) * s.kv_dim(), stream),
        attn(static_cast<std::size_t>(b) * s.q_dim(), stream),
        h(static_cast<std::size_t>(b) * s.hidden, stream),
        gu(static_cast<std::size_t>(b) * 2 * s.intermediate, stream),
        act(static_cast<std::size_t>(b) * s.intermediate, stream),
        tokens(static_cast<std::size_t>(b), stream) {}
  static std::size_t bytes(const ModelShape& s, int b) {
    const std::size_t n = b;
    return n * (4 * (s.hidden + static_cast<std::size_t>(s.vocab)) +
                2 * (2 * s.hidden + s.qkv_dim() + 2 * s.q_dim() + 2 * s.kv_dim() + 3 * s.intermediate) + 4);
  }
};

// ---------------------------------------------------------------------------------------------
// One configuration: a policy, a context, a value cache; prefill once, decode at each batch
// ---------------------------------------------------------------------------------------------

/// Attention for all layers: one SparseAttention object per layer (default) or one for the
/// whole model (`--single-object`). Per-layer objects build each (sequence, layer) with its own
/// finish_prefill, so the staged prompt of only one layer is alive at a time; one object stages
/// every layer of a sequence before its finish_prefill (about 2-3x the sequence's final dense
/// KV bytes), which costs dense one sequence of batch at long contexts. A decode step issues the
/// same per-layer calls either way.
/// Staged prompts and the harness's own prompt buffers (see Attention).
skc::PoolAllocator& staging_pool() {
  static skc::PoolAllocator pool;
  return pool;
}

/// The offloaded values' pinned memory, kept across sequences and runs (as an engine would pin
/// its host pool once): after the first batch of a context, building a sequence pins nothing.
skc::CachingHostAllocator& host_cache() {
  static skc::CachingHostAllocator cache;
  return cache;
}

template <class Policy>
class Attention {
 public:
  using Object = SparseAttention<Policy, CudaBackend, bf16>;
  Attention(const Config& cfg, int layers, bool single) : layers_(layers), single_(single) {
    const int n = single ? 1 : layers;
    for (int i = 0; i < n; ++i)
      objects_.push_back(std::make_unique<Object>(cfg, single ? layers : 1, skc::default_allocator(), host_cache()));
    // Staged prompts and build scratch in a pool of their own, trimmed after a batch is built:
    // in the state's pool they left holes that stayed reserved (+18-21% at 32K/64K, 2026-11-25).
    for (auto& o : objects_) o->set_staging_allocator(staging_pool());
  }
  Object& at(int layer) { return *objects_[single_ ? 0 : layer]; }
  int local(int layer) const { return single_ ? layer : 0; }
  std::vector<std::unique_ptr<Object>>& objects() { return objects_; }
  bool single() const { return single_; }
  StepStats totals() const {
    StepStats s;
    for (const auto& o : objects_) s += o->totals();
    return s;
  }
  void reset_stats() {
    for (auto& o : objects_) o->reset_stats();
  }
  MemoryUsage memory(SeqId id) const {
    MemoryUsage m;
    for (const auto& o : objects_) {
      const MemoryUsage u = o->memory(id);
      m.device_bytes += u.device_bytes;
      m.host_bytes += u.host_bytes;
    }
    return m;
  }

 private:
  int layers_;
  bool single_;
  std::vector<std::unique_ptr<Object>> objects_;
};

/// Landmarks per KV head of a prompt of `context` tokens (what the index holds).
index_t landmarks_of(const Config& cfg, long long context) {
  return context / cfg.chunk_size - cfg.local_chunks - cfg.resolved_outlier_chunks();
}

/// The what-if mode: installs `replay_selection_kernel` as the selection hook of every layer's
/// object for one run, and removes it when destroyed. The batch's ids must be 0 .. b-1 in order
/// (the harness's own), which index the previous-selection state.
class SelectionReplay {
 public:
  template <class Attn>
  SelectionReplay(Attn& attn, int batch, int layers, int kv_heads, int k, double reuse, index_t landmarks,
                  cudaStream_t stream)
      : prev_(static_cast<std::size_t>(batch) * layers * kv_heads * k, stream), calls_(layers, 0) {
    SHADOWKV_CUDA_CHECK(cudaMemsetAsync(prev_.data(), 0xff, prev_.bytes(), stream));  // -1: no step yet
    const int words = static_cast<int>((landmarks + 31) / 32);
    const std::size_t smem = 2 * sizeof(unsigned) * static_cast<std::size_t>(words);
    SHADOWKV_CHECK(smem <= 200 * 1024, "what-if replay: ", landmarks, " landmarks exceed the kernel's shared memory");
    SHADOWKV_CUDA_CHECK(cudaFuncSetAttribute(replay_selection_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    for (int l = 0; l < layers; ++l) {
      auto& object = attn.at(l);
      const int layer = l;
      object.set_selection_hook([this, layer, layers, reuse, words, smem](const skc::SelectionHookArgs& a,
                                                                          cudaStream_t st) {
        for (std::size_t i = 0; i < a.ids.size(); ++i)
          SHADOWKV_CHECK(a.ids[i] == static_cast<SeqId>(i), "what-if replay: batch ids must be 0..b-1 in order");
        replay_selection_kernel<<<dim3(a.num_kv_heads, static_cast<unsigned>(a.ids.size())), kReplayThreads, smem, st>>>(
            a.selected, a.num_landmarks, prev_.data(), layers, layer, a.num_kv_heads, a.k, static_cast<float>(reuse),
            calls_[layer]++, salt_, words);
        SHADOWKV_CUDA_CHECK_LAUNCH();
      });
      objects_.push_back([&object] { object.set_selection_hook({}); });
    }
  }
  SelectionReplay(const SelectionReplay&) = delete;
  SelectionReplay& operator=(const SelectionReplay&) = delete;
  ~SelectionReplay() {
    for (auto& remove : objects_) remove();
  }

 private:
  skc::DeviceBuffer<std::int32_t> prev_;
  std::vector<unsigned> calls_;
  static inline unsigned runs_ = 0;  // SelectionReplay objects so far: each run draws its own chunks
  unsigned salt_ = 0x9E3779B9u * ++runs_;
  std::vector<std::function<void()>> objects_;  // removes the hook of each layer's object
};

/// Random pre-RoPE keys and values for `n` tokens of (sequence, layer), chunk by chunk, through
/// prefill; finish_prefill where the object is complete.
template <class Policy>
void prefill_sequence(Attention<Policy>& attn, SeqId id, const ModelShape& s, long long context,
                      long long chunk, skc::DeviceBuffer<D>& kbuf, skc::DeviceBuffer<D>& vbuf, unsigned seed,
                      cudaStream_t stream) {
  const long long kv = s.kv_dim();
  for (auto& o : attn.objects()) o->add_sequence(id);
  if (attn.single()) attn.at(0).reserve_prompt(id, context, stream);  // staging allocated once
  for (int l = 0; l < s.layers; ++l) {
    if (!attn.single()) attn.at(l).reserve_prompt(id, context, stream);
    for (long long t0 = 0; t0 < context; t0 += chunk) {
      const long long n = std::min(chunk, context - t0);
      const unsigned sd = seed * 2654435761u + static_cast<unsigned>(id) * 40503u + static_cast<unsigned>(l) * 977u +
                          static_cast<unsigned>(t0 / chunk) * 7919u;
      fill_uniform(kbuf.data(), n * kv, sd, 0.f, 1.f, stream);
      fill_uniform(vbuf.data(), n * kv, sd ^ 0x9e3779b9u, 0.f, 1.f, stream);
      attn.at(l).prefill(id, attn.local(l), {},
                         TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(kbuf.data()), {n, s.kv_heads, s.head_dim}),
                         TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(vbuf.data()), {n, s.kv_heads, s.head_dim}),
                         {}, stream);
    }
    if (!attn.single()) attn.at(l).finish_prefill(id, stream);
  }
  if (attn.single()) attn.at(0).finish_prefill(id, stream);
}

/// CUDA events around each layer's attention call of one decode step (`decode_step` records
/// them when an `Engine` points at one): the step's time in attention against the rest.
struct AttentionTimer {
  std::vector<cudaEvent_t> begin, end;
  explicit AttentionTimer(int layers) : begin(layers), end(layers) {
    for (int l = 0; l < layers; ++l) {
      SHADOWKV_CUDA_CHECK(cudaEventCreate(&begin[l]));
      SHADOWKV_CUDA_CHECK(cudaEventCreate(&end[l]));
    }
  }
  AttentionTimer(const AttentionTimer&) = delete;
  AttentionTimer& operator=(const AttentionTimer&) = delete;
  ~AttentionTimer() {
    for (std::size_t l = 0; l < begin.size(); ++l) {
      (void)cudaEventDestroy(begin[l]);
      (void)cudaEventDestroy(end[l]);
    }
  }
  /// Milliseconds in attention, all layers (waits for the last event).
  double ms() const {
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(end.back()));
    double total = 0;
    for (std::size_t l = 0; l < begin.size(); ++l) {
      float t = 0;
      SHADOWKV_CUDA_CHECK(cudaEventElapsedTime(&t, begin[l], end[l]));
      total += t;
    }
    return total;
  }
};

/// Everything a decode step needs.
struct Engine {
  const Model* model;
  Activations* act;
  cublasHandle_t blas;
  cudaStream_t stream;
  AttentionTimer* attention_timer = nullptr;  // set for one instrumented step
};

/// One greedy decode step of `b` sequences `ids` (the first b of the prefilled ones).
template <class Policy>
void decode_step(Engine& e, Attention<Policy>& attn, std::span<const SeqId> ids) {
  const ModelShape& s = e.model->shape();
  Activations& a = *e.act;
  const int b = static_cast<int>(ids.size());
  cudaStream_t st = e.stream;
  embed_kernel<<<b, 256, 0, st>>>(a.tokens.data(), e.model->embedding(), s.hidden, a.x.data());
  SHADOWKV_CUDA_CHECK_LAUNCH();
  const unsigned ew = 1024;
  for (int l = 0; l < s.layers; ++l) {
    const LayerWeights& w = e.model->layer(l);
    add_rmsnorm_kernel<<<b, 256, 0, st>>>(a.x.data(), l == 0 ? nullptr : a.h.data(), w.attn_norm, a.xn.data(),
                                          s.hidden, s.rms_eps);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    linear(e.blas, st, a.xn.data(), w.qkv, a.qkv.data(), CUDA_R_16BF, b, s.qkv_dim(), s.hidden);
    split_qkv_kernel<<<ew, 256, 0, st>>>(a.qkv.data(), b, s.q_dim(), s.kv_dim(), a.q.data(), a.k.data(), a.v.data());
    SHADOWKV_CUDA_CHECK_LAUNCH();
    if (e.attention_timer) SHADOWKV_CUDA_CHECK(cudaEventRecord(e.attention_timer->begin[l], st));
    attn.at(l).decode(attn.local(l), ids,
                      TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(a.q.data()), {b, s.q_heads, s.head_dim}),
                      TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(a.k.data()), {b, s.kv_heads, s.head_dim}),
                      TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(a.v.data()), {b, s.kv_heads, s.head_dim}),
                      TensorView<bf16, 3>(reinterpret_cast<bf16*>(a.attn.data()), {b, s.q_heads, s.head_dim}), st);
    if (e.attention_timer) SHADOWKV_CUDA_CHECK(cudaEventRecord(e.attention_timer->end[l], st));
    linear(e.blas, st, a.attn.data(), w.o, a.h.data(), CUDA_R_16BF, b, s.hidden, s.q_dim());
    add_rmsnorm_kernel<<<b, 256, 0, st>>>(a.x.data(), a.h.data(), w.mlp_norm, a.xn.data(), s.hidden, s.rms_eps);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    linear(e.blas, st, a.xn.data(), w.gate_up, a.gu.data(), CUDA_R_16BF, b, 2 * s.intermediate, s.hidden);
    swiglu_kernel<<<ew, 256, 0, st>>>(a.gu.data(), b, s.intermediate, a.act.data());
    SHADOWKV_CUDA_CHECK_LAUNCH();
    linear(e.blas, st, a.act.data(), w.down, a.h.data(), CUDA_R_16BF, b, s.hidden, s.intermediate);
  }
  add_rmsnorm_kernel<<<b, 256, 0, st>>>(a.x.data(), a.h.data(), e.model->final_norm(), a.xn.data(), s.hidden,
                                        s.rms_eps);
  SHADOWKV_CUDA_CHECK_LAUNCH();
  linear(e.blas, st, a.xn.data(), e.model->lm_head(), a.logits.data(), CUDA_R_32F, b, s.vocab, s.hidden);
  argmax_kernel<<<b, 1024, 0, st>>>(a.logits.data(), s.vocab, a.tokens.data());
  SHADOWKV_CUDA_CHECK_LAUNCH();
}

std::string row_mode_name(double reuse) {
  if (reuse < 0) return "seen";
  char mode[32];
  std::snprintf(mode, sizeof mode, "replay-%.0f%%", reuse * 100);
  return mode;
}

/// Memory the harness sets aside besides the model and the sequences' planned bytes.
struct Budget {
  std::size_t device = 0;  // for the sequences' planned bytes
  std::size_t host = 0;
};

const char* policy_name(bool sparse) { return sparse ? "shadowkv" : "dense"; }

/// Generated tokens the planner provisions per sequence: sequence 0 decodes in every run of a
/// configuration, rounded up to the 256-token blocks generated rows are allocated in.
/// With --fill-cache, up to one step per `budget` landmark chunks comes first (`fill_steps`).
index_t planned_generated(const Options& o, const Config& cfg, long long context) {
  const int runs = static_cast<int>(std::max(o.batches.size(), o.batch_fractions.size()) + o.what_if.size());
  const index_t fill = o.fill_cache ? context / cfg.chunk_size / cfg.budget_chunks() + 1 : 0;
  return (static_cast<index_t>(runs) * (o.warmup + o.steps + 1) + fill + 255) / 256 * 256;  // + the attention-timed step
}

/// Untimed steps that fill a value cache of `capacity` chunks per head: each step brings at
/// most `budget` new chunks per head, so the cache is full (its steady state in a long
/// generation) after capacity / budget steps. None for the paper's pool (capacity = budget).
int fill_steps(const Options& o, int capacity, int budget) {
  return o.fill_cache && capacity > budget ? (capacity + budget - 1) / budget : 0;
}

/// Bytes staged on the device while one build unit (a layer, or the whole model with
/// --single-object) of one sequence waits for its finish_prefill, with the growth copy.
template <class Policy>
std::size_t staging_bytes(const ModelShape& s, long long context, bool single) {
  const std::size_t buffers = Policy::keys == KeyStorage::low_rank ? 3 : 2;
  const std::size_t per_layer = buffers * static_cast<std::size_t>(context) * s.kv_dim() * sizeof(D);
  return (single ? s.layers : 1) * per_layer + per_layer / buffers / 2 + per_layer / buffers;
}

template <class Policy>
void run_policy(const Options& o, const ModelShape& s, const Config& base_cfg, long long context, int vc_setting,
                const Budget& budget, Engine& engine, Report& report) {
  constexpr bool kSparse = Policy::selection != ChunkSelection::all;
  const char* name = policy_name(kSparse);
  const index_t generated = planned_generated(o, base_cfg, context);
  const std::size_t transient = staging_bytes<Policy>(s, context, o.single_object);
  const std::size_t device_budget = budget.device > transient ? budget.device - transient : 0;

  Config cfg = base_cfg;
  cfg.value_cache_chunks = 0;
  if constexpr (kSparse)
    if (context < cfg.min_context()) {
      progress("%s %lld: skipped, shorter than the static set (%lld tokens)", name, context,
               static_cast<long long>(cfg.min_context()));
      return;
    }
  const MemoryPlan plan0 = plan_sequence<Policy>(cfg, s.layers, context, generated, DType::bf16);
  std::int64_t planner_batch = max_batch(plan0, device_budget, budget.host);
  planner_batch = std::min<std::int64_t>(planner_batch, 65535 / s.kv_heads);
  if (o.max_batch > 0) planner_batch = std::min<std::int64_t>(planner_batch, o.max_batch);

  // The batches to run, largest first.
  std::vector<int> batches;
  if (!o.batches.empty()) {
    for (int b : o.batches) {
      if (b > o.activation_batch)
        progress("%s %lld: batch %d skipped: activations were sized for %d", name, context, b, o.activation_batch);
      else if (b > planner_batch)
        progress("%s %lld: batch %d skipped: the planner allows at most %lld", name, context, b,
                 static_cast<long long>(planner_batch));
      else batches.push_back(b);
    }
  } else {
    for (double f : o.batch_fractions)
      batches.push_back(std::min(o.activation_batch, std::max(1, static_cast<int>(std::floor(f * planner_batch)))));
  }
  std::sort(batches.begin(), batches.end(), std::greater<>());
  batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
  if (planner_batch < 1 || batches.empty()) {
    progress("%s %lld: nothing fits (planner batch %lld; per sequence %.2f GiB device, %.2f GiB host; budget %.1f / %.1f GiB)",
             name, context, static_cast<long long>(planner_batch), plan0.device_bytes / kGiB, plan0.host_bytes / kGiB,
             device_budget / kGiB, budget.host / kGiB);
    return;
  }
  const int b_max = batches.front();

  // The value cache: the budget, a fixed capacity, or the planner's capacity from the device
  // memory the largest batch leaves free.
  std::string vc_mode = "budget";
  if constexpr (kSparse) {
    const index_t landmarks = context / cfg.chunk_size - cfg.local_chunks - cfg.resolved_outlier_chunks();
    const int cap_limit = static_cast<int>(std::min<index_t>(landmarks, skc::kMaxSlotCapacity));
    if (vc_setting > 0) {
      cfg.value_cache_chunks = std::max(vc_setting, cfg.budget_chunks());
      vc_mode = "fixed";
    } else if (vc_setting < 0) {
      vc_mode = "auto";
      Config one = cfg;
      one.value_cache_chunks = cfg.budget_chunks() + 1;
      const std::size_t slope = plan_sequence<Policy>(one, s.layers, context, generated, DType::bf16).device_bytes -
                                plan0.device_bytes;  // per chunk of capacity, per sequence
      const std::size_t per_seq = device_budget / b_max;
      // 10% of the room is left to the allocator as a margin (pool granularity). Staging and
      // build scratch live in staging_pool(), so they no longer fragment the state's pool.
      const std::size_t extra = per_seq > plan0.device_bytes ? (per_seq - plan0.device_bytes) / 10 * 9 / slope : 0;
      cfg.value_cache_chunks = static_cast<int>(std::min<std::size_t>(cfg.budget_chunks() + extra, cap_limit));
      if (cfg.value_cache_chunks < cfg.budget_chunks()) cfg.value_cache_chunks = cfg.budget_chunks();
    }
  }
  const MemoryPlan plan = plan_sequence<Policy>(cfg, s.layers, context, generated, DType::bf16);
  const int capacity = kSparse ? cfg.resolved_value_cache_chunks() : 0;
  SHADOWKV_CHECK(static_cast<std::size_t>(b_max) * plan.device_bytes <= device_budget &&
                     static_cast<std::size_t>(b_max) * plan.host_bytes <= budget.host,
                 "internal: batch ", b_max, " does not fit the plan");
  progress("%s %lld%s%s: planner batch %lld, running %zu batch(es) from %d; per sequence %.3f GiB device + %.3f GiB host"
           " (value cache %d chunks/head); staging reserve %.2f GiB",
           name, context, kSparse ? " value cache " : "", kSparse ? vc_mode.c_str() : "",
           static_cast<long long>(planner_batch), batches.size(), b_max, plan.device_bytes / kGiB, plan.host_bytes / kGiB,
           capacity, transient / kGiB);

  cudaStream_t stream = engine.stream;
  {
    Attention<Policy> attn(cfg, s.layers, o.single_object);
    // Prefill b_max sequences; smaller batches decode the first b of them.
    const long long chunk = std::min(o.prefill_chunk, context);
    SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
    staging_pool().trim();
    const auto [free_before, total_dev] = device_free_total();
    skc::DeviceBuffer<D> kbuf(static_cast<std::size_t>(chunk) * s.kv_dim(), stream, staging_pool()),
        vbuf(static_cast<std::size_t>(chunk) * s.kv_dim(), stream, staging_pool());
    const double t_prefill = elapsed_s();
    std::vector<SeqId> ids;
    for (int i = 0; i < b_max; ++i) {
      const double t0 = elapsed_s();
      prefill_sequence(attn, i, s, context, chunk, kbuf, vbuf, o.seed + 1000u * static_cast<unsigned>(context >> 10), stream);
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      ids.push_back(i);
      progress("%s %lld: sequence %d/%d prefilled in %.2f s; device free %.2f GiB, staging pool %.2f GiB", name,
               context, i + 1, b_max, elapsed_s() - t0, device_free_total().first / kGiB,
               staging_pool().reserved_bytes() / kGiB);
    }
    kbuf = {};
    vbuf = {};
    SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
    staging_pool().trim();
    const auto [free_after, total_dev2] = device_free_total();
    const std::size_t measured_per_seq = free_before > free_after ? (free_before - free_after) / b_max : 0;
    (void)total_dev;
    (void)total_dev2;
    const MemoryUsage mem0 = attn.memory(0);
    progress("%s %lld: batch of %d ready in %.1f s; memory(0) %.3f GiB device (plan %.3f before decoding), "
             "%.3f GiB host; device free %.1f -> %.1f GiB = %.3f GiB per sequence taken",
             name, context, b_max, elapsed_s() - t_prefill, mem0.device_bytes / kGiB,
             plan_sequence<Policy>(cfg, s.layers, context, 0, DType::bf16).device_bytes / kGiB, mem0.host_bytes / kGiB,
             free_before / kGiB, free_after / kGiB, measured_per_seq / kGiB);

    index_t generated0 = 0;  // tokens sequence 0 has decoded
    auto set_first_tokens = [&](int b) {  // fresh random first tokens
      std::vector<std::int32_t> first(b);
      for (int i = 0; i < b; ++i) first[i] = static_cast<std::int32_t>((1000003ull * (i + 1) + o.seed) % s.vocab);
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(engine.act->tokens.data(), first.data(), b * sizeof(std::int32_t),
                                          cudaMemcpyHostToDevice, stream));
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));  // `first` goes out of scope
    };
    const int fill = kSparse ? fill_steps(o, capacity, cfg.budget_chunks()) : 0;
    if (fill > 0) {
      const double t0 = elapsed_s();
      set_first_tokens(b_max);
      for (int i = 0; i < fill; ++i) decode_step(engine, attn, std::span<const SeqId>(ids.data(), b_max));
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      generated0 += fill;
      progress("%s %lld: %d untimed steps at batch %d filled the value cache (%d chunks/head) in %.1f s", name, context,
               fill, b_max, capacity, elapsed_s() - t0);
    }
    // Runs (batch b, what-if reuse fraction or -1 for the selections as seen).
    std::vector<std::pair<int, double>> runs;
    for (int b : batches) runs.emplace_back(b, -1.0);
    if constexpr (kSparse)
      for (double f : o.what_if) runs.emplace_back(b_max, f);
    for (const auto& [b, reuse] : runs) {
      std::span<const SeqId> run_ids(ids.data(), b);
      std::optional<SelectionReplay> replay;
      if constexpr (kSparse)
        if (reuse >= 0) replay.emplace(attn, b, s.layers, s.kv_heads, cfg.budget_chunks(), reuse, landmarks_of(cfg, context), stream);
      generated0 += o.warmup + o.steps;
      set_first_tokens(b);
      const double t0 = elapsed_s();
      for (int i = 0; i < o.warmup; ++i) decode_step(engine, attn, run_ids);
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      attn.reset_stats();
      progress("%s %lld batch %d: %d warm-up steps in %.2f s; timing %d steps", name, context, b, o.warmup,
               elapsed_s() - t0, o.steps);
      double ms = 0, issue_ms = 0;
      {
        EventTimer timer(stream);
        const double t_issue = elapsed_s();
        for (int i = 0; i < o.steps; ++i) decode_step(engine, attn, run_ids);
        issue_ms = (elapsed_s() - t_issue) * 1e3;  // host time to enqueue: ~ms when the CPU is the limit
        ms = timer.ms();
      }
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      const StepStats st = attn.totals();
      const MemoryUsage mem = attn.memory(0);
      if constexpr (kSparse)
        if (std::getenv("SHADOWKV_TRACE_SELECTION")) {
          // Diagnostic (not timed, not counted): what consecutive steps select for sequence 0,
          // KV head 0 of the first and last layer.
          for (int l : {0, s.layers - 1}) {
            std::vector<std::int32_t> prev = attn.at(l).last_selection(0, attn.local(l), 0, stream);
            std::set<std::int32_t> seen(prev.begin(), prev.end());
            double overlap = 0;
            constexpr int kTrace = 8;
            for (int i = 0; i < kTrace; ++i) {
              decode_step(engine, attn, run_ids);
              const std::vector<std::int32_t> sel = attn.at(l).last_selection(0, attn.local(l), 0, stream);
              std::set<std::int32_t> p(prev.begin(), prev.end());
              int same = 0;
              for (std::int32_t c : sel) same += static_cast<int>(p.count(c));
              overlap += sel.empty() ? 0.0 : static_cast<double>(same) / sel.size();
              seen.insert(sel.begin(), sel.end());
              prev = sel;
            }
            generated0 += kTrace;
            progress("trace %s layer %d: %zu chunks selected, %.1f%% of each step's in the step before, %zu distinct "
                     "over %d steps", row_mode_name(reuse).c_str(), l, prev.size(), 100.0 * overlap / kTrace,
                     seen.size(), kTrace + 1);
          }
        }
      Row row;
      row.policy = name;
      row.context = context;
      row.batch = b;
      row.planner_batch = static_cast<int>(planner_batch);
      row.value_cache_mode = kSparse ? vc_mode : "";
      row.value_cache_chunks = capacity;
      row.ms_per_step = ms / o.steps;
      row.tokens_per_s = static_cast<double>(b) * o.steps / (ms / 1e3);
      row.has_hit_rate = kSparse && st.pool.requested > 0;
      row.hit_rate = st.pool.hit_rate();
      row.device_bytes_per_seq = mem.device_bytes;
      row.host_bytes_per_seq = mem.host_bytes;
      const MemoryPlan now = plan_sequence<Policy>(cfg, s.layers, context, generated0, DType::bf16);
      row.planned_device_bytes_per_seq = now.device_bytes;
      row.planned_host_bytes_per_seq = now.host_bytes;
      row.measured_device_bytes_per_seq = measured_per_seq;
      row.pcie_mb_per_step = st.pcie_bytes / 1e6 / o.steps;
      row.mode = row_mode_name(reuse);
      row.attention_hbm_mb_per_step = st.hbm_bytes / 1e6 / o.steps;
      row.host_issue_ms_per_step = issue_ms / o.steps;
      row.cache_fill_steps = fill;
      row.skipped = st.skipped;
      if (st.skipped != 0)
        progress("%s %lld batch %d: WARNING: %lld slot-table rows or miss entries were skipped as inconsistent", name,
                 context, b, static_cast<long long>(st.skipped));
      {  // one more step with events around each layer's attention: its share of the step
        AttentionTimer at(s.layers);
        engine.attention_timer = &at;
        decode_step(engine, attn, run_ids);
        engine.attention_timer = nullptr;
        row.attention_ms_per_step = at.ms();
        generated0 += 1;
      }
      progress("%s %lld batch %d (%s): %.2f ms/step (host enqueues in %.2f ms; attention %.2f ms of one more step), "
               "%.1f tokens/s, hit rate %s%%, PCIe %.1f MB/step", name, context, b, row.mode.c_str(), row.ms_per_step,
               row.host_issue_ms_per_step, row.attention_ms_per_step,
               row.tokens_per_s, row.has_hit_rate ? num_or_null(row.hit_rate * 100, true, 4).c_str() : "-",
               row.pcie_mb_per_step);
      report.rows.push_back(row);
      write_json(report, o.json);  // after every row: a run cut short still leaves its rows
    }
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());  // the freed sequences go back to the pool
}

/// The ShadowKV build of one sequence of `context` tokens (all layers), timed with events:
/// prefill calls (staging + streamed Gram) + finish_prefill, the random keys and values made
/// before the clock starts; and the same through DensePolicy (staging copies only).
template <class Policy>
std::pair<double, double> time_build(const Options& o, const ModelShape& s, const Config& cfg, long long context,
                                     cudaStream_t stream) {
  const long long chunk = std::min(o.prefill_chunk, context);
  const long long kv = s.kv_dim();
  const long long n_chunks = (context + chunk - 1) / chunk;
  // One layer's prompt, reused for every layer (the build's cost does not depend on the values).
  skc::DeviceBuffer<D> k(static_cast<std::size_t>(context) * kv, stream), v(static_cast<std::size_t>(context) * kv, stream);
  fill_uniform(k.data(), k.size(), o.seed + 77u, 0.f, 1.f, stream);
  fill_uniform(v.data(), v.size(), o.seed + 78u, 0.f, 1.f, stream);
  // One object for the model, as an engine holds it: finish_prefill then batches the layers'
  // eigensolves (the throughput runs keep one object per layer only to bound staging memory).
  Attention<Policy> attn(cfg, s.layers, /*single=*/true);
  for (auto& obj : attn.objects()) obj->add_sequence(0);
  if (attn.single()) attn.at(0).reserve_prompt(0, context, stream);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  double finish_ms = 0;
  EventTimer total(stream);
  for (int l = 0; l < s.layers; ++l) {
    if (!attn.single()) attn.at(l).reserve_prompt(0, context, stream);
    for (long long c = 0; c < n_chunks; ++c) {
      const long long t0 = c * chunk, n = std::min(chunk, context - t0);
      attn.at(l).prefill(0, attn.local(l), {},
                         TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(k.data()) + t0 * kv, {n, s.kv_heads, s.head_dim}),
                         TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(v.data()) + t0 * kv, {n, s.kv_heads, s.head_dim}),
                         {}, stream);
    }
    if (!attn.single() || l + 1 == s.layers) {
      EventTimer f(stream);
      attn.at(l).finish_prefill(0, stream);
      finish_ms += f.ms();
    }
  }
  const double ms = total.ms();
  return {ms, finish_ms};
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

/// Least-squares t(B) = a + c·B over the dense rows of one context; the dense throughput that
/// unlimited memory would give at batch B is then B / t(B).
std::optional<std::pair<double, double>> fit_dense(const std::vector<Row>& rows, long long context) {
  double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  std::vector<int> seen;
  for (const Row& r : rows)
    if (r.policy == "dense" && r.context == context) {
      n += 1;
      sx += r.batch;
      sy += r.ms_per_step;
      sxx += static_cast<double>(r.batch) * r.batch;
      sxy += r.batch * r.ms_per_step;
      seen.push_back(r.batch);
    }
  std::sort(seen.begin(), seen.end());
  if (std::unique(seen.begin(), seen.end()) - seen.begin() < 2) return std::nullopt;
  const double c = (n * sxy - sx * sy) / (n * sxx - sx * sx);
  return std::make_pair((sy - c * sx) / n, c);
}

void print_table(const Report& r) {
  std::printf("\n%-9s %8s %6s %8s %7s %-11s %10s %10s %8s %10s %10s %9s\n", "policy", "context", "batch", "planner",
              "vcache", "mode", "tokens/s", "ms/step", "hit", "dev GiB/sq", "host GiB/sq", "PCIe MB");
  for (const Row& w : r.rows) {
    char vc[24] = "-";
    if (w.policy != "dense") std::snprintf(vc, sizeof vc, "%d", w.value_cache_chunks);
    char hit[16] = "-";
    if (w.has_hit_rate) std::snprintf(hit, sizeof hit, "%.1f%%", w.hit_rate * 100);
    std::printf("%-9s %8lld %6d %8d %7s %-11s %10.1f %10.2f %8s %10.3f %10.3f %9.1f\n", w.policy.c_str(), w.context,
                w.batch, w.planner_batch, vc, w.mode.c_str(), w.tokens_per_s, w.ms_per_step, hit, w.device_bytes_per_seq / kGiB,
                w.host_bytes_per_seq / kGiB, w.pcie_mb_per_step);
  }
  // The issue's two ratios per context: ShadowKV at its largest batch against dense at dense's
  // largest batch, and against dense extrapolated to ShadowKV's batch (t = a + c·B).
  std::vector<long long> contexts;
  for (const Row& w : r.rows) contexts.push_back(w.context);
  std::sort(contexts.begin(), contexts.end());
  contexts.erase(std::unique(contexts.begin(), contexts.end()), contexts.end());
  bool header = false;
  for (long long ctx : contexts) {
    const Row* dense = nullptr;
    for (const Row& w : r.rows)
      if (w.policy == "dense" && w.context == ctx && (!dense || w.batch > dense->batch)) dense = &w;
    const auto fit = fit_dense(r.rows, ctx);
    for (const Row& w : r.rows) {
      if (w.policy == "dense" || w.context != ctx) continue;
      bool largest = true;  // the largest batch of its (context, value cache) configuration
      for (const Row& x : r.rows)
        if (x.policy == w.policy && x.context == ctx && x.value_cache_mode == w.value_cache_mode &&
            x.value_cache_chunks == w.value_cache_chunks && x.mode == w.mode && x.batch > w.batch)
          largest = false;
      if (!largest) continue;
      if (!header) {
        std::printf("\n%-8s %-8s %-11s %6s %10s %14s %16s\n", "context", "vcache", "mode", "batch", "tokens/s",
                    "vs dense max", "vs dense unlim.");
        header = true;
      }
      char a[32] = "-", b[32] = "-";
      if (dense) std::snprintf(a, sizeof a, "%.2fx (B=%d)", w.tokens_per_s / dense->tokens_per_s, dense->batch);
      if (fit) {
        const double t = fit->first + fit->second * w.batch;
        if (t > 0) std::snprintf(b, sizeof b, "%.2fx", w.tokens_per_s / (w.batch / (t / 1e3)));
      }
      std::printf("%-8lld %-8s %-11s %6d %10.1f %14s %16s\n", ctx, w.value_cache_mode.c_str(), w.mode.c_str(), w.batch,
                  w.tokens_per_s, a, b);
    }
  }
  const PrefillOverhead& p = r.prefill;
  if (p.measured)
    std::printf("\nShadowKV build of one %lld-token sequence, %d layers: %.1f ms (finish_prefill %.1f ms; staging alone "
                "%.1f ms). Divide by bench/prefill_sdpa.py's dense prefill attention for the overhead.\n",
                p.context, p.layers, p.shadowkv_ms, p.shadowkv_finish_ms, p.staging_ms);
}

int run(Options& o) {
  ModelShape s;
  s.layers = o.layers;
  Config base;  // Llama-3.1-8B attention, the paper's ShadowKV defaults
  base.num_q_heads = s.q_heads;
  base.num_kv_heads = s.kv_heads;
  base.head_dim = s.head_dim;
  base.rope = llama31_rope();
  base.validate();

  Report report;
  report.command = o.command;
  report.date = utc_now();
  int dev = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  SHADOWKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  int driver = 0;
  SHADOWKV_CUDA_CHECK(cudaDriverGetVersion(&driver));
  report.device = std::string(prop.name) + ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor) +
                  ", CUDA driver " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10);
  report.weight_bytes = s.weight_bytes();
  progress("%s; %s", report.device.c_str(), report.date.c_str());

  cudaStream_t stream;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Activations are sized for the largest batch any configuration can get: the planner's batch
  // with the device budget before the model is allocated (an upper bound of the later one).
  const std::size_t mem_avail = host_available_bytes();
  const double host_left = std::min(o.host_gib * kGiB, mem_avail ? static_cast<double>(mem_avail) : o.host_gib * kGiB) -
                           o.host_reserve_gib * kGiB;
  const std::size_t host_budget = host_left > 0 ? static_cast<std::size_t>(host_left) : 0;
  int max_b = 1;
  if (!o.batches.empty()) {
    max_b = *std::max_element(o.batches.begin(), o.batches.end());
  } else {
    const double dev_est = o.device_gib * kGiB - static_cast<double>(s.weight_bytes()) - o.reserve_gib * kGiB;
    const std::size_t dev_budget = dev_est > 0 ? static_cast<std::size_t>(dev_est) : 0;
    for (long long ctx : o.contexts)
      for (const std::string& p : o.policies) {
        std::int64_t b = 0;
        if (p == "dense") b = max_batch(plan_sequence<DensePolicy>(base, s.layers, ctx, planned_generated(o, base, ctx), DType::bf16),
                                        dev_budget, host_budget);
        else if (ctx >= base.min_context())
          b = max_batch(plan_sequence<ShadowKVPolicy>(base, s.layers, ctx, planned_generated(o, base, ctx), DType::bf16),
                        dev_budget, host_budget);
        max_b = static_cast<int>(std::max<std::int64_t>(max_b, std::min<std::int64_t>(b, 65535 / s.kv_heads)));
      }
    if (o.max_batch > 0) max_b = std::min(max_b, o.max_batch);
  }
  {
    const std::size_t act_cap_bytes = static_cast<std::size_t>(4) << 30;  // activations for at most 4 GiB worth
    const int act_b = static_cast<int>(std::min<std::size_t>(max_b, act_cap_bytes / Activations::bytes(s, 1)));
    Model model(s, o.shared_weights, o.seed, stream);
    Activations act(s, act_b, stream);
    cublasHandle_t blas = skc::thread_library_handles().blas;
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    progress("model: %d layers, %.2f GiB of weights (%s), activations for batch <= %d (%.2f GiB)", s.layers,
             s.weight_bytes() / kGiB, o.shared_weights ? "one layer's set shared by all layers; the planner counts all"
                                                       : "distinct per layer",
             act_b, Activations::bytes(s, act_b) / kGiB);
    o.activation_batch = act_b;

    // Budgets: the device's usable bytes minus what is in use now (context, weights,
    // activations) and the reserve; the host's RAM left minus its reserve.
    const auto [free_dev, total_dev] = device_free_total();
    const std::size_t used_now = total_dev - free_dev;
    const std::size_t unaccounted_weights =
        o.shared_weights ? s.weight_bytes() - std::min(s.weight_bytes(), model.allocated_bytes()) : 0;
    const double device_usable = o.device_gib * kGiB;
    const double dev_left = std::min(device_usable - used_now, static_cast<double>(free_dev)) - unaccounted_weights -
                            o.reserve_gib * kGiB;
    Budget budget;
    budget.device = dev_left > 0 ? static_cast<std::size_t>(dev_left) : 0;
    budget.host = host_budget;
    progress("device: %.1f GiB total, %.1f GiB in use (context, weights, activations); budget for sequences %.1f GiB "
             "(--device-gib %.1f, --reserve-gib %.1f); host: MemAvailable %.1f GiB, budget %.1f GiB (--host-gib %.1f, "
             "--host-reserve-gib %.1f)",
             total_dev / kGiB, used_now / kGiB, budget.device / kGiB, o.device_gib, o.reserve_gib, mem_avail / kGiB,
             budget.host / kGiB, o.host_gib, o.host_reserve_gib);

    Engine engine{&model, &act, blas, stream};
    for (long long ctx : o.contexts) {
      for (const std::string& p : o.policies) {
        if (p == "dense") {
          run_policy<DensePolicy>(o, s, base, ctx, 0, budget, engine, report);
        } else {
          for (const std::string& vc : o.value_cache)
            run_policy<ShadowKVPolicy>(o, s, base, ctx, parse_value_cache(vc), budget, engine, report);
        }
      }
      // Another context needs blocks of another size: the host budget must be free again.
      if (host_cache().cached_bytes() > 0) {
        progress("releasing %.1f GiB of cached pinned memory", host_cache().cached_bytes() / kGiB);
        host_cache().release();
      }
    }

    if (o.prefill_overhead_context > 0) {
      const long long ctx = o.prefill_overhead_context;
      progress("prefill overhead: building one %lld-token sequence (%d layers) with ShadowKV, then dense staging", ctx,
               s.layers);
      // The first build pins the host pool (cold); the second reuses it, as an engine's steady state.
      const auto [cold_ms, cold_finish] = time_build<ShadowKVPolicy>(o, s, base, ctx, stream);
      (void)cold_finish;
      const auto [skv_ms, finish_ms] = time_build<ShadowKVPolicy>(o, s, base, ctx, stream);
      const auto [dense_ms, dense_finish] = time_build<DensePolicy>(o, s, base, ctx, stream);
      (void)dense_finish;
      report.prefill = {ctx, s.layers, skv_ms, finish_ms, dense_ms, cold_ms, true};
      progress("prefill overhead: ShadowKV build %.1f ms with the pinned pool warm (finish_prefill %.1f ms), %.1f ms "
               "cold (pinning its host memory), dense staging %.1f ms", skv_ms, finish_ms, cold_ms, dense_ms);
      write_json(report, o.json);
    }
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  SHADOWKV_CUDA_CHECK(cudaStreamDestroy(stream));
  write_json(report, o.json);
  print_table(report);
  if (!o.json.empty()) std::printf("\nrows written to %s\n", o.json.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 0; i < argc; ++i) o.command += (i ? " " : "") + std::string(argv[i]);
  CLI::App app{
      "throughput: end-to-end greedy decode tokens/s of a Llama-3.1-8B-shaped model (random bf16 weights,\n"
      "cuBLAS linear layers) with attention through SparseAttention<ShadowKVPolicy> or <DensePolicy>.\n\n"
      "For each context and policy, the memory planner (plan_sequence + max_batch) picks the largest\n"
      "batch that fits the device budget (--device-gib minus the weights, activations, --reserve-gib and\n"
      "the staging of one build) and the host budget (min(--host-gib, MemAvailable) minus\n"
      "--host-reserve-gib); the harness prefills that many sequences with random pre-RoPE keys and\n"
      "values through the real build path, then decodes at that batch and at the smaller ones\n"
      "(--batch-fractions, or --batches), each with --warmup steps and --steps steps timed with CUDA\n"
      "events. Rows: tokens/s = batch x steps / time, ms per step, value-cache hit rate (totals()),\n"
      "device and host bytes per sequence (memory()). Last, the ShadowKV build time of one\n"
      "--prefill-overhead-context sequence (compare with bench/prefill_sdpa.py). The table comes last;\n"
      "--json writes the rows after each one, so a run cut short keeps what it measured.\n\n"
      "Hit rates are those seen with random weights and random prompts (rows with mode \"seen\"); the replay-N% rows bracket them with synthetic selection traces.",
      "throughput"};
  app.get_formatter()->column_width(34);
  app.add_flag("--quick", o.quick,
               "smoke configuration for the GPU machine: 2 layers, context 32768, batch 2, 2 warm-up + 5 timed "
               "steps, both policies, value cache budget and auto, prefill overhead at 32768 (other options "
               "given explicitly still apply)");
  app.add_option("--layers", o.layers, "decoder layers")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--contexts", o.contexts, "prompt lengths in tokens")
      ->delimiter(',')
      ->check(CLI::Range(1LL, 1LL << 24))
      ->capture_default_str();
  app.add_option("--policies", o.policies, "attention policies: dense, shadowkv")
      ->delimiter(',')
      ->check(CLI::IsMember({"dense", "shadowkv"}))
      ->capture_default_str();
  app.add_option("--value-cache-chunks", o.value_cache,
                 "ShadowKV device value slots per KV head, one run each: 0 = the budget (the paper), 'auto' = the "
                 "planner's capacity from the device memory the largest batch leaves free, N = N chunks")
      ->delimiter(',')
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            try {
              parse_value_cache(s);
            } catch (const CLI::ValidationError&) {
              return "'" + s + "' is neither 'auto' nor a chunk count >= 0";
            }
            return {};
          },
          "0|auto|N"))
      ->capture_default_str();
  app.add_option("--batches", o.batches,
                 "explicit batch sizes instead of the planner's (each must fit the planner's largest batch; "
                 "larger ones are skipped with a message)")
      ->delimiter(',')
      ->check(CLI::Range(1, 8191));
  app.add_option("--batch-fractions", o.batch_fractions, "batches to run as fractions of the planner's largest batch")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--what-if", o.what_if,
                 "ShadowKV only, at the largest batch: extra runs whose selections are replaced by a synthetic "
                 "trace reusing this fraction of the previous step's chunks per (sequence, layer, KV head), the "
                 "rest random chunks it did not select (rows with mode replay-N%)")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  bool no_what_if = false;
  app.add_flag("--no-what-if", no_what_if, "leave out the what-if runs");
  bool no_fill_cache = false;
  app.add_flag("--no-fill-cache", no_fill_cache,
               "start timing with the value cache as the prefill left it (empty) instead of first running the "
               "capacity/budget untimed steps that fill a cache larger than the budget");
  app.add_option("--max-batch", o.max_batch, "cap on the planner's batch (0: none)")
      ->check(CLI::Range(0, 8191))
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "untimed decode steps before each timed run (the first misses everything)")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  app.add_option("--steps", o.steps, "timed decode steps per run")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--device-gib", o.device_gib, "usable device memory, GiB (the H200: 139.8)")
      ->check(CLI::Range(1.0, 4096.0))
      ->capture_default_str();
  app.add_option("--host-gib", o.host_gib, "host RAM for offloaded values, GiB (capped by MemAvailable)")
      ->check(CLI::Range(0.0, 65536.0))
      ->capture_default_str();
  app.add_option("--reserve-gib", o.reserve_gib,
                 "device memory kept free for cuBLAS/cuSOLVER workspaces and per-step scratch, GiB")
      ->check(CLI::Range(0.0, 1024.0))
      ->capture_default_str();
  app.add_option("--host-reserve-gib", o.host_reserve_gib, "host RAM left to the OS and the process, GiB")
      ->check(CLI::Range(0.0, 1024.0))
      ->capture_default_str();
  app.add_option("--prefill-chunk", o.prefill_chunk, "prompt tokens per prefill call")
      ->check(CLI::Range(1LL, 1LL << 24))
      ->capture_default_str();
  app.add_flag("--single-object", o.single_object,
               "one SparseAttention for all layers (an engine's layout) instead of one per layer; its finish_prefill "
               "needs every layer's staged prompt at once, which the planner's budget then sets aside");
  app.add_flag("--shared-weights", o.shared_weights,
               "allocate one layer's weights and use them in every layer (the planner still counts the full "
               "model's weights; speed is unchanged: each layer's weights exceed the L2)");
  app.add_option("--prefill-overhead-context", o.prefill_overhead_context,
                 "time the ShadowKV build of one sequence of this many tokens (0: skip)")
      ->check(CLI::Range(0LL, 1LL << 24))
      ->capture_default_str();
  app.add_option("--json", o.json, "write the rows, device, date and command to this file");
  app.add_option("--seed", o.seed, "seed of the random weights and prompts")->capture_default_str();
  try {
    app.parse(argc, argv);
    if (o.quick) {
      auto unset = [&](const char* flag) { return app.get_option(flag)->count() == 0; };
      if (unset("--layers")) o.layers = 2;
      if (unset("--contexts")) o.contexts = {32768};
      if (unset("--batches")) o.batches = {2};
      if (unset("--warmup")) o.warmup = 2;
      if (unset("--steps")) o.steps = 5;
      if (unset("--prefill-overhead-context")) o.prefill_overhead_context = 32768;
      if (unset("--what-if")) o.what_if = {0.6};
    }
    if (no_what_if) o.what_if.clear();
    if (no_fill_cache) o.fill_cache = false;
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints the help, or the error naming the option
    return rc == 0 ? 0 : 2;
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
