// accuracy: how often dense, ShadowKV and oracle attention let the project's trained model
// (models/retrieval-6l) find the passkey and the asked-for needle, at several context lengths
// and budgets; a rank sweep and the outlier ablation at one length; attention-level figures
// (output error against dense, chunk recall against the oracle, hit rate) per layer. See
// docs/accuracy.md. The run itself is accuracy_run.hpp; this file holds the command line and
// the CPU glue, accuracy_cuda.cu the GPU glue.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "accuracy_run.hpp"

namespace fs = std::filesystem;
using namespace shadowkv_bench::accuracy;

namespace shadowkv_bench::accuracy {

/// The CPU glue: views are host memory already.
struct CpuIo {
  std::vector<float> scratch_;
  std::vector<float> host(TensorView<const float, 3> v, const std::tuple<>&) {
    return std::vector<float>(v.data, v.data + v.numel());
  }
  TensorView<float, 3> scratch(index_t n, index_t h, index_t d, const std::tuple<>&) {
    scratch_.assign(static_cast<std::size_t>(n * h * d), 0.0f);
    return TensorView<float, 3>(scratch_.data(), {n, h, d});
  }
  void sync(const std::tuple<>&) {}
};

#if SHADOWKV_ACCURACY_CUDA
/// Defined in accuracy_cuda.cu: the run on the GPU (`device_name` filled in), and the number
/// of CUDA devices (0 with `why` when there are none).
void run_cuda(const Options& o, const ModelConfig& cfg, const WeightStore& store, const RetrievalTasks& tasks,
              nlohmann::json& result, std::string& device_name, const std::function<void()>& checkpoint);
int cuda_devices(std::string& why);
#endif

}  // namespace shadowkv_bench::accuracy

namespace {

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

/// The summary printed last: accuracy per (task, length) for each configuration.
void print_tables(const nlohmann::json& result) {
  std::map<std::string, std::map<std::int64_t, std::map<std::string, double>>> grid;  // task -> length -> label
  std::vector<std::string> labels;
  for (const auto& r : result["rows"]) {
    const std::string p = r["policy"];
    std::string label = p;
    if (p != "dense") label += " b" + std::to_string(r["budget_tokens"].get<int>());
    if (p == "shadowkv") label += " r" + std::to_string(r["rank"].get<int>());
    if (!r["outliers"].get<bool>()) label += " no-outl";
    if (r["group"] != "grid") label = "[" + r["group"].get<std::string>() + "] " + label;
    grid[r["task"]][r["context"]][label] = r["accuracy"];
    if (std::find(labels.begin(), labels.end(), label) == labels.end()) labels.push_back(label);
  }
  for (const auto& [task, by_len] : grid) {
    std::printf("\n%s: accuracy (%%), %d cases per cell\n%-34s", task.c_str(), result["cases"].get<int>(), "config");
    for (const auto& kv : by_len) std::printf(" %8lld", static_cast<long long>(kv.first));
    std::printf("\n");
    for (const std::string& label : labels) {
      bool any = false;
      for (const auto& kv : by_len) any |= kv.second.count(label) != 0;
      if (!any) continue;
      std::printf("%-34s", label.c_str());
      for (const auto& kv : by_len) {
        const auto it = kv.second.find(label);
        if (it == kv.second.end())
          std::printf(" %8s", "-");
        else
          std::printf(" %8.1f", 100.0 * it->second);
      }
      std::printf("\n");
    }
  }
  if (result.contains("attention")) {
    std::printf("\nattention per layer (teacher-forced decode): output rel. error vs dense | chunk recall vs oracle | hit rate\n");
    for (const auto& r : result["attention"]) {
      if (r["policy"] != "shadowkv") continue;
      std::printf("shadowkv b%-5d r%-4d layer %d: %.4f | %.3f | %.3f\n", r["budget_tokens"].get<int>(),
                  r["rank"].get<int>(), r["layer"].get<int>(), r["output_rel_error"].get<double>(),
                  r["chunk_recall"].get<double>(), r["hit_rate"].get<double>());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  o.model = SHADOWKV_DEFAULT_MODEL_DIR;
  std::string tasks_csv = "passkey,mk-niah";
  bool quick = false;
  CLI::App app{"Accuracy of dense, ShadowKV and oracle attention on the trained retrieval model (docs/accuracy.md)"};
  app.add_option("--model", o.model, "model folder with config.json, model.safetensors and tasks.json")
      ->capture_default_str();
  app.add_option("--device", o.device, "auto (cuda when the build has it and a GPU is there), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--tasks", tasks_csv, "comma-separated tasks of the model's tasks.json")->capture_default_str();
  app.add_option("--lengths", o.lengths, "prompt lengths in tokens")->delimiter(',')->check(CLI::Range(64, 1 << 24));
  app.add_option("--cases", o.cases, "test cases per task and length")->check(CLI::Range(1, 1000000))->capture_default_str();
  app.add_option("--budgets", o.budgets, "sparse budgets, percent of the context")
      ->delimiter(',')
      ->check(CLI::Range(0.01, 100.0));
  app.add_option("--rank", o.rank, "ShadowKV rank (0: 15.625% of num_kv_heads * head_dim)")->check(CLI::NonNegativeNumber);
  app.add_option("--rank-sweep", o.rank_sweep, "ranks of the sweep")->delimiter(',')->check(CLI::Range(1, 1 << 20));
  CLI::Option* sweep_length =
      app.add_option("--sweep-length", o.sweep_length,
                     "length of the rank sweep and outlier ablation, one of --lengths (0: none)")
          ->check(CLI::NonNegativeNumber)
          ->capture_default_str();
  app.add_option("--sweep-budget", o.sweep_budget, "budget of the sweep, percent")
      ->check(CLI::Range(0.01, 100.0))
      ->capture_default_str();
  app.add_option("--attention-length", o.attention_length, "length of the attention-level figures (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--attention-cases", o.attention_cases, "cases per task for the attention-level figures")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--chunk-size", o.chunk_size, "tokens per chunk")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--local-chunks", o.local_chunks, "exact chunks at the end of the prompt")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the test cases (SplitMix64; training used Python's random)")
      ->capture_default_str();
  app.add_option("--json", o.json_out, "write the results here (JSON)");
  app.add_flag("--quick", quick, "a smoke run: 2048 tokens, 3 cases, 2 attention cases");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  for (int i = 0; i < argc; ++i) o.command += (i ? " " : "") + std::string(argv[i]);
  if (quick) {
    o.lengths = {2048};
    o.cases = 3;
    o.sweep_length = 2048;
    o.rank_sweep = {16, 64};
    o.attention_length = 2048;
    o.attention_cases = 2;
  }
  try {
    if (!fs::is_directory(o.model)) {
      std::fprintf(stderr, "error: --model: '%s' is not a directory\n", o.model.c_str());
      return 2;
    }
    const ModelConfig cfg = load_model_config(o.model);
    const WeightStore store(o.model);
    const RetrievalTasks tasks(o.model);
    std::stringstream list(tasks_csv);
    for (std::string t; std::getline(list, t, ',');) {
      if (!tasks.has(t)) {
        std::fprintf(stderr, "error: --tasks: '%s' is not a task of %s/tasks.json\n", t.c_str(), o.model.c_str());
        return 2;
      }
      o.tasks.push_back(t);
    }
    if (o.tasks.empty()) {
      std::fprintf(stderr, "error: --tasks: no task given\n");
      return 2;
    }
    for (const std::string& t : o.tasks)
      for (std::int64_t l : o.lengths)
        if (l < tasks.fixed_tokens(t) + 16) {
          std::fprintf(stderr, "error: --lengths: %lld is too short for task %s (at least %lld)\n",
                       static_cast<long long>(l), t.c_str(), static_cast<long long>(tasks.fixed_tokens(t) + 16));
          return 2;
        }
    // The sweep runs beside the grid at one of its lengths: an explicit --sweep-length elsewhere
    // is an error, the default one is left out with a note (e.g. --lengths 2048 alone).
    if (o.sweep_length > 0 && std::find(o.lengths.begin(), o.lengths.end(), o.sweep_length) == o.lengths.end()) {
      std::string have;
      for (std::int64_t l : o.lengths) have += (have.empty() ? "" : ",") + std::to_string(l);
      if (sweep_length->count() > 0) {
        std::fprintf(stderr, "error: --sweep-length: %lld is not one of --lengths (%s); pass 0 for no sweep\n",
                     static_cast<long long>(o.sweep_length), have.c_str());
        return 2;
      }
      std::printf("note: no rank sweep or outlier ablation: their default length %lld is not one of --lengths (%s)\n",
                  static_cast<long long>(o.sweep_length), have.c_str());
      o.sweep_length = 0;
    }
    std::vector<int> ranks = o.rank_sweep;
    ranks.push_back(o.rank);
    for (const int r : ranks)
      if (r > cfg.num_kv_heads * cfg.head_dim) {
        std::fprintf(stderr, "error: %s: %d exceeds num_kv_heads*head_dim=%d of this model\n",
                     r == o.rank ? "--rank" : "--rank-sweep", r, cfg.num_kv_heads * cfg.head_dim);
        return 2;
      }
    std::string why;
#if SHADOWKV_ACCURACY_CUDA
    const int gpus = cuda_devices(why);
    if (o.device == "auto") o.device = gpus > 0 ? "cuda" : "cpu";
    if (o.device == "cuda" && gpus == 0) {
      std::fprintf(stderr, "error: --device: cuda asked for but %s\n", why.c_str());
      return 2;
    }
#else
    if (o.device == "cuda") {
      std::fprintf(stderr, "error: --device: this build has no CUDA (configure with nvcc to get it)\n");
      return 2;
    }
    o.device = "cpu";
#endif
    std::printf("accuracy: model %s, device %s, tasks %s, %d cases per cell\n", o.model.c_str(), o.device.c_str(),
                tasks_csv.c_str(), o.cases);
    std::fflush(stdout);
    nlohmann::json result = {{"command", o.command}, {"date", utc_now()},     {"model", o.model},
                             {"seed", o.seed},       {"cases", o.cases},       {"rows", nlohmann::json::array()}};
    const auto t0 = std::chrono::steady_clock::now();
    // Writes what is measured so far (`complete` false until the end).
    const auto write_json = [&](bool complete) {
      if (o.json_out.empty()) return;
      result["device"] = o.device_name;
      result["seconds"] = seconds_since(t0);
      result["complete"] = complete;
      std::ofstream out(o.json_out);
      out << result.dump(1) << "\n";
      if (!out.good()) throw std::runtime_error("--json: cannot write '" + o.json_out + "'");
    };
    const std::function<void()> checkpoint = [&] { write_json(false); };
#if SHADOWKV_ACCURACY_CUDA
    if (o.device == "cuda") {
      run_cuda(o, cfg, store, tasks, result, o.device_name, checkpoint);
    } else
#endif
    {
      o.device_name = "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " hardware threads)";
      CpuIo io;
      run<CpuBackend>(o, cfg, store, tasks, io, result, checkpoint);
    }
    result["device"] = o.device_name;
    result["seconds"] = seconds_since(t0);
    print_tables(result);
    std::printf("\n%.0f s on %s\n", result["seconds"].get<double>(), o.device_name.c_str());
    write_json(true);
    if (!o.json_out.empty()) std::printf("wrote %s\n", o.json_out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
