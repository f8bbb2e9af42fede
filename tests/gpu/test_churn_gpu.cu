// Continuous-batching churn on the GPU (issue 8, docs/reliability.md): thousands of random
// operations on one `SparseAttention<Policy, CudaBackend>` holding a ragged batch (add a sequence
// with a random prompt length, prefill a random chunk of it with or without prefill attention,
// finish its prompt, decode one step of every layer for a random subset of the prefilled
// sequences in a random order, remove one, and calls that must fail), each sequence mirrored in
// an object of its own that sees only its calls, with the same device inputs. Every object takes
// its pinned memory from one `CachingHostAllocator`, as an engine would: blocks of removed
// sequences come back to new ones.
//
// What must be equal. The kernels compute each (sequence, head) on its own: RoPE, the landmark
// scores (per-tile partials of the sequence's own landmarks, merged over its own tiles), top-k,
// the slot table and the key rebuild give the batch and the sequence alone the same bits. The one
// thing the batch changes is the split of the decode attention: `plan_decode_attention` picks the
// rows per split from the batch size and the longest sequence, and splits of other boundaries add
// the rows in another order. A sequence attends to at most `length` rows (static + selected +
// generated <= prompt + generated), and no call splits rows when every sequence of it has at most
// 256 (`kMinRowsPerSplit`): then the decode outputs must be equal bit for bit; past that, within
// the dtype's attention tolerance (`skv_test::attention_tolerance`), with the same selections. Prefill
// attention runs per sequence with the same plan in both objects: bit for bit always. Lengths,
// memory and selected chunks must agree too; a failing call must change nothing.
//
// SHADOWKV_CHURN_OPS sets the operations over all runs (default 4000; the compute-sanitizer runs
// of scripts/gpu-check lower it).

#include <algorithm>
#include <map>
#include <memory>

#include "../reliability/churn_driver.hpp"
#include "gpu_reliability_util.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;
using skv_test::ChurnFigures;
using skv_test::random_rows;
using skv_test::same_bits;

TEST_SUITE_BEGIN("gpu_churn");

namespace {

/// Rows up to which `plan_decode_attention` never splits (its smallest split).
constexpr index_t kUnsplitRows = 256;

template <class Policy, class T>
class Churn : public skv_test::ChurnDriver<Churn<Policy, T>, SparseAttention<Policy, CudaBackend, T>> {
  using Attn = SparseAttention<Policy, CudaBackend, T>;
  using Base = skv_test::ChurnDriver<Churn, Attn>;
  using typename Base::Seq;
  using Base::batch_, Base::cfg_, Base::f_, Base::kLayers, Base::live_, Base::rng_;
  static constexpr std::size_t kMaxLive = 10;
  static constexpr std::size_t kMaxBatch = 8;

 public:
  Churn(std::uint64_t seed, cudaStream_t stream, skc::HostAllocator& pinned)
      : Base(seed, skc::default_allocator(), pinned), stream_(stream), pinned_(&pinned) {}

  bool add() {
    if (live_.size() >= kMaxLive) return false;
    Seq s;
    s.solo = std::make_unique<Attn>(cfg_, kLayers, skc::default_allocator(), *pinned_);
    // Mostly prompts that stay unsplit for a while; one in four long enough to split at once.
    s.target = this->prompt_length(rng_() % 4 ? static_cast<index_t>(rng_() % 160)
                                              : 200 + static_cast<index_t>(rng_() % 200));
    const SeqId id = this->absent_id();
    const index_t guess = rng_() % 4 ? 0 : (rng_() % 2 ? s.target : s.target / 2);
    Attn& solo = *s.solo;
    this->add_live(id, std::move(s));
    if (guess > 0) {  // staging reserved up front, sometimes too short (it grows)
      batch_.reserve_prompt(id, guess, stream_);
      solo.reserve_prompt(id, guess, stream_);
    }
    return true;
  }

  void prefill_layer(Seq& s, SeqId id, int l, index_t n, bool with_queries) {
    const auto k = device_rows(n, cfg_.num_kv_heads), v = device_rows(n, cfg_.num_kv_heads);
    if (!with_queries) {
      batch_.prefill(id, l, {}, k.view(), v.view(), {}, stream_);
      s.solo->prefill(id, l, {}, k.view(), v.view(), {}, stream_);
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream_));  // before the inputs go
      return;
    }
    const auto q = device_rows(n, cfg_.num_q_heads);
    auto out_batch = output_rows(n), out_solo = output_rows(n);
    batch_.prefill(id, l, q.view(), k.view(), v.view(), out_batch.mut(), stream_);
    s.solo->prefill(id, l, q.view(), k.view(), v.view(), out_solo.mut(), stream_);
    REQUIRE(same_bits(out_batch.download(stream_), out_solo.download(stream_)));
  }
  void finish_prefill(Attn& attn, SeqId id) { attn.finish_prefill(id, stream_); }

  /// One step, every layer, for a random subset of the prefilled sequences in a random order.
  bool decode() {
    REQUIRE(cudaPeekAtLastError() == cudaSuccess);  // nothing left by a failing call
    std::vector<SeqId> ids = this->ids_where([](const Seq& s) { return s.finished; });
    if (ids.empty()) return false;
    std::shuffle(ids.begin(), ids.end(), rng_);
    ids.resize(1 + rng_() % std::min(ids.size(), kMaxBatch));
    const index_t b = static_cast<index_t>(ids.size());
    // After this step a sequence attends to at most its length in rows.
    index_t longest = 0;
    for (SeqId id : ids) longest = std::max(longest, batch_.length(id) + 1);
    f_.longest = std::max(f_.longest, longest);
    const bool exact = longest <= kUnsplitRows;
    const index_t q_row = static_cast<index_t>(cfg_.num_q_heads) * cfg_.head_dim;
    const index_t kv_row = static_cast<index_t>(cfg_.num_kv_heads) * cfg_.head_dim;
    for (int l = 0; l < kLayers; ++l) {
      const auto q = device_rows(b, cfg_.num_q_heads), k = device_rows(b, cfg_.num_kv_heads),
                 v = device_rows(b, cfg_.num_kv_heads);
      auto out = output_rows(b);
      batch_.decode(l, ids, q.view(), k.view(), v.view(), out.mut(), stream_);
      const std::vector<T> got_all = out.download(stream_);
      for (index_t i = 0; i < b; ++i) {
        Attn& solo = *live_.at(ids[i]).solo;
        auto own = output_rows(1);
        const SeqId one[] = {ids[i]};
        solo.decode(l, one, TensorView<const T, 3>(q.view().data + i * q_row, {1, cfg_.num_q_heads, cfg_.head_dim}),
                    TensorView<const T, 3>(k.view().data + i * kv_row, {1, cfg_.num_kv_heads, cfg_.head_dim}),
                    TensorView<const T, 3>(v.view().data + i * kv_row, {1, cfg_.num_kv_heads, cfg_.head_dim}),
                    own.mut(), stream_);
        const std::vector<T> want = own.download(stream_);
        const std::vector<T> got(got_all.begin() + i * q_row, got_all.begin() + (i + 1) * q_row);
        CAPTURE(ids[i]);
        CAPTURE(l);
        CAPTURE(longest);
        if (exact) {
          REQUIRE(same_bits(got, want));
        } else {
          const double err = skv_test::rel_error(skv_test::to_double(got), skv_test::to_double(want));
          CAPTURE(err);
          REQUIRE(err < skv_test::attention_tolerance<T>());
          ++f_.within_tolerance;
        }
        for (int h = 0; h < cfg_.num_kv_heads; ++h) {
          CAPTURE(h);
          REQUIRE(batch_.last_selection(ids[i], l, h, stream_) == solo.last_selection(ids[i], l, h, stream_));
        }
      }
      f_.decoded += b;
    }
    for (SeqId id : ids) this->check_agrees(id);
    ++f_.decodes;
    return true;
  }

  /// A decode of `ids` (that must fail before any launch) with any inputs.
  void bad_decode(std::vector<SeqId> ids) {
    const index_t b = static_cast<index_t>(ids.size());
    const auto q = device_rows(b, cfg_.num_q_heads), kv = device_rows(b, cfg_.num_kv_heads);
    auto out = output_rows(b);
    batch_.decode(static_cast<int>(rng_() % kLayers), ids, q.view(), kv.view(), kv.view(), out.mut(), stream_);
  }

 private:
  /// Device inputs and outputs are freed by `cudaFree` at the end of their scope; every scope
  /// that launches work on them ends with a download or a synchronisation of the stream.
  skv_gpu_test::DeviceRows<T> device_rows(index_t n, int heads) {
    return skv_gpu_test::DeviceRows<T>(random_rows<T>(rng_, n, heads, cfg_.head_dim));
  }
  skv_gpu_test::DeviceRows<T> output_rows(index_t n) {
    return skv_gpu_test::DeviceRows<T>(skv_test::output_rows<T>(n, cfg_.num_q_heads, cfg_.head_dim));
  }

  cudaStream_t stream_;
  skc::HostAllocator* pinned_;
};

template <class Policy, class T>
ChurnFigures churn_runs(std::uint64_t seed, int runs, int ops, cudaStream_t stream, skc::HostAllocator& pinned) {
  ChurnFigures total;
  for (int r = 0; r < runs; ++r) {
    CAPTURE(seed + r);
    total += Churn<Policy, T>(seed + r, stream, pinned).run(ops);
  }
  MESSAGE(Policy::name, " (", dtype_name<T>(), "): ", runs, " runs, ", total.ops, " operations survived (", total.adds,
          " adds, ", total.prefills, " prefill chunks, ", total.finishes, " finishes, ", total.decodes,
          " decode steps, ", total.removes, " removes, ", total.bad_calls, " failing calls); decode outputs (sequence x "
          "layer) ", total.decoded - total.within_tolerance, " equal bit for bit, ", total.within_tolerance,
          " within tolerance (split rows); up to ", total.max_live, " live sequences, ", total.longest, " tokens");
  return total;
}

}  // namespace

TEST_CASE("gpu churn: random add / prefill / decode / remove on a ragged batch equals each sequence alone") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  const int ops = skv_test::env_count("SHADOWKV_CHURN_OPS", 4000);
  skv_gpu_test::Stream stream;
  skc::CachingHostAllocator pinned;
  ChurnFigures all;
  // Runs of a fresh random configuration each; the operations split 40/25/15/20 %.
  all += churn_runs<ShadowKVPolicy, float>(seed, 2, std::max(1, ops * 40 / 200), stream.get(), pinned);
  all += churn_runs<DensePolicy, float>(seed + 100, 2, std::max(1, ops * 25 / 200), stream.get(), pinned);
  all += churn_runs<OracleTopKPolicy, float>(seed + 200, 1, std::max(1, ops * 15 / 100), stream.get(), pinned);
  all += churn_runs<ShadowKVPolicy, bf16>(seed + 300, 1, std::max(1, ops * 20 / 100), stream.get(), pinned);
  MESSAGE("gpu churn: ", all.ops, " operations survived in all; ", all.decoded - all.within_tolerance,
          " decode outputs equal bit for bit to the sequence alone, ", all.within_tolerance, " within tolerance");
  CHECK(all.decoded > all.within_tolerance);
}

TEST_SUITE_END();
