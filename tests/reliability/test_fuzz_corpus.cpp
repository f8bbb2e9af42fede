// The fuzzers' inputs, replayed with the ordinary compiler (and under the sanitizers in the
// sanitizer build): every seed of tests/fuzz/corpus/<target>/ and every input a fuzzer once
// crashed on, kept in tests/fuzz/regressions/<target>/, must be accepted or rejected with a
// shadowkv::Error, never anything else. The seeds named malformed_* must be rejected, the
// others accepted (so that the fuzzers start from inputs that reach deep into the parsers).

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "../fuzz/fuzz_targets.hpp"
#include "reliability_util.hpp"

TEST_SUITE_BEGIN("fuzz_corpus");

TEST_CASE("fuzz_corpus: every seed and regression input of the three fuzz targets") {
  namespace fs = std::filesystem;
  int seeds = 0, regressions = 0;
  for (const skv_fuzz::Target& target : skv_fuzz::kTargets) {
    for (const char* kind : {"corpus", "regressions"}) {
      const fs::path folder = fs::path(SHADOWKV_FUZZ_DIR) / kind / target.name;
      if (!fs::is_directory(folder)) continue;
      std::vector<fs::path> files;
      for (const auto& entry : fs::directory_iterator(folder))
        if (entry.is_regular_file()) files.push_back(entry.path());
      std::sort(files.begin(), files.end());
      for (const fs::path& file : files) {
        CAPTURE(file.string());
        std::ifstream in(file, std::ios::binary);
        const std::string bytes((std::istreambuf_iterator<char>(in)), {});
        bool accepted = false;
        CHECK_NOTHROW(accepted = target.run(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()));
        if (std::string(kind) == "corpus") {
          CHECK(accepted == !file.filename().string().starts_with("malformed_"));
          ++seeds;
        } else {
          ++regressions;
        }
      }
    }
  }
  CHECK(seeds > 0);
  MESSAGE("fuzz_corpus: ", seeds, " seeds and ", regressions, " regression inputs replayed");
}

TEST_SUITE_END();
