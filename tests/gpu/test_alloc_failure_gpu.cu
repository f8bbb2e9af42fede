// Allocation-failure injection on the GPU (issue 8, docs/reliability.md): `SparseAttention<Policy,
// CudaBackend>` given a device allocator and a pinned host allocator that share one counter and
// fail its n-th allocation, swept over every n of a prefill + decode scenario (two sequences of
// different lengths, chunked prefill with prefill attention, batched decode steps, a removal;
// one layer, and three, whose finish_prefill solves the bases in one batched call).
//
// Each failure must surface from the call as the allocator's `shadowkv::Error` (nothing else, and
// no CUDA error left pending); the call is then retried on the same object (the API promises that
// a failed allocation changes nothing, so the object stays usable) and every output of the run
// must equal the failure-free run's bit for bit, with as many device and pinned bytes live at the
// end (no growth across retries). A second sweep destroys the object right after the failure.
// After each run, once the object is gone, the two allocators must have every byte back (and no
// block freed twice or with another size), and the device's default memory pool must hold what it
// held before: memory taken without the caller's allocator would show there.
//
// SHADOWKV_ALLOC_SWEEP_STRIDE=k tries every k-th n only (the compute-sanitizer runs use it).

#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "gpu_reliability_util.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;
using skv_gpu_test::CountingDeviceAllocator;
using skv_gpu_test::CountingHostAllocator;
using skv_gpu_test::DeviceRows;
using skv_gpu_test::FailNth;
using skv_test::contains;
using skv_test::random_rows;
using skv_test::same_bits;

TEST_SUITE_BEGIN("gpu_alloc_failure");

namespace {

enum class AfterFailure { retry, destroy };

struct SweepFigures {
  std::int64_t allocations = 0;  ///< in the failure-free scenario
  std::int64_t injected = 0, surfaced = 0, absorbed = 0;
  std::int64_t device_allocations = 0, pinned_allocations = 0;  ///< of the failure-free scenario
  SweepFigures& operator+=(const SweepFigures& o) {
    allocations += o.allocations, injected += o.injected, surfaced += o.surfaced, absorbed += o.absorbed;
    device_allocations += o.device_allocations, pinned_allocations += o.pinned_allocations;
    return *this;
  }
};

/// What one run of the scenario did.
struct RunResult {
  bool failed = false;  ///< a call threw
  std::string error;    ///< what it threw
  bool retry_failed = false;
  /// Live with the object alive, at the end of the run.
  std::size_t device_bytes_at_end = 0, pinned_bytes_at_end = 0;
  std::uint64_t default_pool_bytes_at_end = 0;
};

/// Runs `step`; false, with what it threw, when it throws.
bool attempt(const std::function<void()>& step, std::string& error) {
  try {
    step();
    return true;
  } catch (const Error& e) {
    error = e.what();
  } catch (const std::exception& e) {
    error = std::string("(not a shadowkv::Error) ") + e.what();
  }
  return false;
}

/// The scenario's calls, each a step that can be retried. Inputs live on the device for the whole
/// sweep; outputs are poisoned before each run.
template <class Policy>
class Scenario {
  using Attn = SparseAttention<Policy, CudaBackend, float>;

 public:
  Scenario(std::uint64_t seed, int layers, cudaStream_t stream)
      : rng_(seed), layers_(layers), stream_(stream), device_(&inject_), pinned_(&inject_) {
    steps_.push_back([this] { attn_.emplace(cfg_, layers_, device_, pinned_); });
    steps_.push_back([this] { attn_->add_sequence(1); });
    for (index_t n : {24, 17})
      for (int l = 0; l < layers_; ++l) prefill_step(1, l, n, true);
    steps_.push_back([this] { attn_->add_sequence(2); });
    for (int l = 0; l < layers_; ++l) prefill_step(2, l, 29, false);
    steps_.push_back([this] { attn_->finish_prefill(1, stream_); });
    steps_.push_back([this] { attn_->finish_prefill(2, stream_); });
    for (int step = 0; step < 3; ++step)
      for (int l = 0; l < layers_; ++l) decode_step({2, 1}, l);
    steps_.push_back([this] { attn_->remove_sequence(1); });
    for (int l = 0; l < layers_; ++l) decode_step({2}, l);
  }

  /// Runs the steps with the n-th allocation failing (0: none); after a failure, retries the
  /// step or destroys the object. Downloads the outputs and destroys the object at the end.
  RunResult run(std::int64_t n, AfterFailure after) {
    for (auto& o : outputs_) o.poison(stream_);
    RunResult r;
    inject_.arm(n);
    for (const auto& step : steps_) {
      if (attempt(step, r.error)) continue;
      r.failed = true;
      if (cudaPeekAtLastError() != cudaSuccess)
        r.error += std::string(" [CUDA error left pending: ") + cudaGetErrorName(cudaGetLastError()) + "]";
      if (after == AfterFailure::destroy) {
        attn_.reset();
        break;
      }
      std::string retry;
      if (!attempt(step, retry)) {  // one allocation fails, once: the retry must work
        r.retry_failed = true;
        r.error += " [retry: " + retry + "]";
        break;
      }
    }
    r.default_pool_bytes_at_end = skv_gpu_test::default_pool_bytes_in_use();
    r.device_bytes_at_end = device_.live().bytes();
    r.pinned_bytes_at_end = pinned_.live().bytes();
    downloaded_.clear();
    if (attn_)
      for (const auto& o : outputs_) downloaded_.push_back(o.download(stream_));
    attn_.reset();
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return r;
  }

  const FailNth& inject() const { return inject_; }
  const CountingDeviceAllocator& device() const { return device_; }
  const CountingHostAllocator& pinned() const { return pinned_; }
  /// The outputs of the last run that kept its object to the end.
  const std::vector<std::vector<float>>& outputs() const { return downloaded_; }

 private:
  void prefill_step(SeqId id, int l, index_t n, bool with_queries) {
    const DeviceRows<float>& k = keep(random_rows<float>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim));
    const DeviceRows<float>& v = keep(random_rows<float>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim));
    if (!with_queries) {
      steps_.push_back([this, id, l, &k, &v] { attn_->prefill(id, l, {}, k.view(), v.view(), {}, stream_); });
      return;
    }
    const DeviceRows<float>& q = keep(random_rows<float>(rng_, n, cfg_.num_q_heads, cfg_.head_dim));
    DeviceRows<float>& out = output(n);
    steps_.push_back([this, id, l, &q, &k, &v, &out] {
      attn_->prefill(id, l, q.view(), k.view(), v.view(), out.mut(), stream_);
    });
  }

  void decode_step(std::vector<SeqId> ids, int l) {
    const index_t b = static_cast<index_t>(ids.size());
    const DeviceRows<float>& q = keep(random_rows<float>(rng_, b, cfg_.num_q_heads, cfg_.head_dim));
    const DeviceRows<float>& k = keep(random_rows<float>(rng_, b, cfg_.num_kv_heads, cfg_.head_dim));
    const DeviceRows<float>& v = keep(random_rows<float>(rng_, b, cfg_.num_kv_heads, cfg_.head_dim));
    DeviceRows<float>& out = output(b);
    steps_.push_back([this, ids, l, &q, &k, &v, &out] {
      attn_->decode(l, ids, q.view(), k.view(), v.view(), out.mut(), stream_);
    });
  }

  const DeviceRows<float>& keep(const skv_test::RandomRows<float>& rows) { return inputs_.emplace_back(rows); }
  DeviceRows<float>& output(index_t n) {
    return outputs_.emplace_back(skv_test::output_rows<float>(n, cfg_.num_q_heads, cfg_.head_dim));
  }

  std::mt19937_64 rng_;
  int layers_;
  cudaStream_t stream_;
  Config cfg_ = skv_test::small_config();
  FailNth inject_;
  CountingDeviceAllocator device_;
  CountingHostAllocator pinned_;
  std::optional<Attn> attn_;
  std::deque<DeviceRows<float>> inputs_, outputs_;  // the steps refer to them
  std::vector<std::vector<float>> downloaded_;
  std::vector<std::function<void()>> steps_;
};

/// Sweeps n = 1, 1 + stride, ... over the allocations of the scenario.
template <class Policy>
SweepFigures sweep(std::uint64_t seed, int layers, AfterFailure after, cudaStream_t stream) {
  Scenario<Policy> s(seed, layers, stream);
  SweepFigures f;
  s.run(0, AfterFailure::retry);  // first-use allocations of the process (library handles)
  const std::uint64_t pool_before = skv_gpu_test::default_pool_bytes_in_use();
  const std::int64_t device_before = s.device().live().allocations(), pinned_before = s.pinned().live().allocations();
  const RunResult clean = s.run(0, AfterFailure::retry);
  REQUIRE_FALSE(clean.failed);
  f.allocations = s.inject().seen();
  f.device_allocations = s.device().live().allocations() - device_before;
  f.pinned_allocations = s.pinned().live().allocations() - pinned_before;
  REQUIRE(f.allocations == f.device_allocations + f.pinned_allocations);
  REQUIRE(f.pinned_allocations > 0);
  CHECK(clean.default_pool_bytes_at_end == pool_before);  // nothing taken past the allocators
  const auto want = s.outputs();
  const int stride = skv_test::env_count("SHADOWKV_ALLOC_SWEEP_STRIDE", 1);
  for (std::int64_t n = 1; n <= f.allocations; n += stride) {
    CAPTURE(n);
    const RunResult r = s.run(n, after);
    CAPTURE(r.error);
    REQUIRE(s.inject().fired());  // the scenario allocates as often each time
    ++f.injected;
    if (r.failed) {
      ++f.surfaced;
      CHECK(contains(r.error, "(injected)"));
      CHECK_FALSE(contains(r.error, "not a shadowkv::Error"));
      CHECK_FALSE(contains(r.error, "CUDA error left pending"));
    } else {
      ++f.absorbed;
    }
    CHECK_FALSE(r.retry_failed);
    if (after == AfterFailure::retry || !r.failed) {
      bool same = s.outputs().size() == want.size();
      for (std::size_t i = 0; same && i < want.size(); ++i) same = same_bits(s.outputs()[i], want[i]);
      CHECK(same);
      // What the object holds at the end is the failure-free run's, except that the descriptor
      // ring may have grown other slots: a call that fails after some of its launches took
      // ring slots shifts which slot each later blob lands in (seen on the H200: +4224 bytes,
      // pinned and device alike). Each slot is a pinned + device pair of one size, so the two
      // differences are equal, and the ring's fixed number of slots bounds them.
      const auto extra_device = static_cast<std::int64_t>(r.device_bytes_at_end) -
                                static_cast<std::int64_t>(clean.device_bytes_at_end);
      const auto extra_pinned = static_cast<std::int64_t>(r.pinned_bytes_at_end) -
                                static_cast<std::int64_t>(clean.pinned_bytes_at_end);
      CHECK(extra_device == extra_pinned);
      CHECK(extra_pinned >= 0);
      CHECK(extra_pinned <= static_cast<std::int64_t>(clean.pinned_bytes_at_end));
    }
    CHECK(r.default_pool_bytes_at_end == pool_before);
    // The object is gone: every byte back, nothing freed twice, no error pending.
    CHECK(s.device().live().bytes() == 0);
    CHECK(s.pinned().live().bytes() == 0);
    CHECK(s.device().live().bad_frees() == 0);
    CHECK(s.pinned().live().bad_frees() == 0);
    CHECK(cudaGetLastError() == cudaSuccess);
  }
  s.run(f.allocations + 1, after);
  CHECK_FALSE(s.inject().fired());
  return f;
}

template <class Policy>
SweepFigures sweeps(std::uint64_t seed, int layers, cudaStream_t stream) {
  SweepFigures all;
  for (AfterFailure after : {AfterFailure::retry, AfterFailure::destroy}) {
    CAPTURE(layers);
    CAPTURE(after == AfterFailure::retry ? "retry" : "destroy");
    const SweepFigures f = sweep<Policy>(seed, layers, after, stream);
    MESSAGE(Policy::name, ", ", layers, " layer(s), ", after == AfterFailure::retry ? "retry" : "destroy", ": ",
            f.allocations, " allocations (", f.device_allocations, " device, ", f.pinned_allocations, " pinned), ",
            f.injected, " failures injected, ", f.surfaced, " surfaced as shadowkv::Error, ", f.absorbed, " absorbed");
    all += f;
  }
  return all;
}

}  // namespace

TEST_CASE("gpu alloc_failure: every device and pinned allocation of prefill + decode fails in turn (ShadowKV)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  skv_gpu_test::Stream stream;
  const SweepFigures one = sweeps<ShadowKVPolicy>(seed, 1, stream.get());
  const SweepFigures three = sweeps<ShadowKVPolicy>(seed + 1, 3, stream.get());
  CHECK(one.injected > 0);
  CHECK(three.injected > 0);
}

TEST_CASE("gpu alloc_failure: every device and pinned allocation of prefill + decode fails in turn (Dense, Oracle)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  skv_gpu_test::Stream stream;
  CHECK(sweeps<DensePolicy>(seed, 1, stream.get()).injected > 0);
  CHECK(sweeps<OracleTopKPolicy>(seed + 1, 1, stream.get()).injected > 0);
}

TEST_SUITE_END();
