#!/usr/bin/env bash
# Builds phi3edge._sampling with AddressSanitizer + UndefinedBehaviorSanitizer (cmake, in a temp
# dir) and runs tests/test_sampling.py against that build. Any sanitizer report fails the run.
#
#   scripts/sanitize_sampler.sh [extra pytest args]
#
# pytest imports the sanitized module from a temp copy of the phi3edge package. Python runs with
# -S (no .pth files, so no installed or editable phi3edge can take precedence) and with the
# site-packages directories on PYTHONPATH after that copy.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/phi3edge-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT

sanitize="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all"
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")

echo "building the sanitized extension in $work/build"
cmake -S "$repo" -B "$work/build" \
    -DCMAKE_BUILD_TYPE=None \
    -DCMAKE_CXX_FLAGS="-O1 -g -fno-omit-frame-pointer $sanitize" \
    -DCMAKE_MODULE_LINKER_FLAGS="$sanitize" \
    -DSKBUILD_PROJECT_NAME=phi3edge \
    -DSKBUILD_PROJECT_VERSION="$version" \
    -DPython_EXECUTABLE="$(command -v "$python")" \
    -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >"$work/cmake.log" 2>&1 ||
    { cat "$work/cmake.log"; exit 1; }
cmake --build "$work/build" -j2 >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }

mkdir -p "$work/pkg/phi3edge"
cp "$repo"/phi3edge/*.py "$work/pkg/phi3edge/"
cp "$work"/build/_sampling*.so "$work/pkg/phi3edge/"
site_packages=$("$python" -c 'import site; print(":".join(site.getsitepackages()))')

# libstdc++ is preloaded too: python does not link it, and ASan resolves __cxa_throw at startup.
export LD_PRELOAD
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$work/pkg:$site_packages"

loaded=$(cd "$work" && "$python" -S -c 'import phi3edge._sampling as s; print(s.__file__)')
case "$loaded" in
"$work/pkg/"*) echo "testing $loaded" ;;
*) echo "expected the sanitized module, got $loaded" >&2; exit 1 ;;
esac

cd "$work"
# --capture=sys leaves fd 2 alone, so that sanitizer reports reach the terminal.
"$python" -S -m pytest "$repo/tests/test_sampling.py" --noconftest -p no:cacheprovider --capture=sys -q "$@"
