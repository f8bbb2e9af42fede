# shellcheck shell=bash
# What scripts/test and scripts/demo share (sourced, not run): the Debian packages the build
# needs, installed when any is missing, and the configuration of the main build folder.
#
# Environment:
#   SHADOWKV_JOBS        parallel build jobs (default: nproc)
#   SHADOWKV_CMAKE_ARGS  extra arguments for every CMake configure, split on spaces
#                        (e.g. "-DSHADOWKV_CUDA=OFF" or "-DCMAKE_CUDA_ARCHITECTURES=90-real")

SHADOWKV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHADOWKV_DEB_PACKAGES=(cmake ninja-build g++ libeigen3-dev doctest-dev libbenchmark-dev
                       libcli11-dev nlohmann-json3-dev)
# What the fuzzing step of scripts/test adds: clang, and its runtime libraries (libFuzzer and the
# sanitizers live in libclang-rt-<version>-dev, which clang only recommends).
SHADOWKV_FUZZ_DEB_PACKAGES=(clang libclang-rt-dev)
# What the training-script step of scripts/test adds: Debian's Python and PyTorch (CPU), for
# tools/train/test_train.py.
SHADOWKV_TRAIN_DEB_PACKAGES=(python3 python3-torch)
SHADOWKV_JOBS="${SHADOWKV_JOBS:-$(nproc)}"
read -r -a SHADOWKV_EXTRA_CMAKE_ARGS <<< "${SHADOWKV_CMAKE_ARGS:-}"

# The packages of SHADOWKV_DEB_PACKAGES / SHADOWKV_FUZZ_DEB_PACKAGES that are missing, installed.
shadowkv_install_deps() { shadowkv_install_packages "${SHADOWKV_DEB_PACKAGES[@]}"; }
shadowkv_install_fuzz_deps() { shadowkv_install_packages "${SHADOWKV_FUZZ_DEB_PACKAGES[@]}"; }
shadowkv_install_train_deps() { shadowkv_install_packages "${SHADOWKV_TRAIN_DEB_PACKAGES[@]}"; }

# Installs the packages named that are not installed (apt-get, through sudo when not root); does
# nothing when all are.
shadowkv_install_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  echo "shadowkv: installing missing packages: ${missing[*]}"
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "shadowkv: missing packages (${missing[*]}), not root and no sudo: install them first" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "shadowkv: missing packages (${missing[*]}) and no apt-get: install them first" >&2
    return 1
  fi
  "${sudo[@]}" apt-get update &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      "${missing[@]}"
}

# CMake arguments that find nvcc: the CUDA toolkit's default place is often not on PATH.
# Nothing when CUDACXX is set or nvcc is on PATH (CMake finds it) or there is no toolkit (the
# build is then CPU-only).
shadowkv_cuda_args() {
  if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null 2>&1 &&
     [[ -x /usr/local/cuda/bin/nvcc ]]; then
    echo "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"
  fi
}

# Configures the main build folder build/: Release, Ninja, CUDA when nvcc is found.
shadowkv_configure_main() {
  local cuda_args
  read -r -a cuda_args <<< "$(shadowkv_cuda_args)"
  cmake -S "$SHADOWKV_ROOT" -B "$SHADOWKV_ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "${cuda_args[@]}" "${SHADOWKV_EXTRA_CMAKE_ARGS[@]}"
}
