#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the native code, in two parts:
#   1. the engine's C++ tests (CMake preset `asan`, through ctest);
#   2. the Python extension built with ZETAGUARD_SANITIZE=ON in build/asan-py, imported instead
#      of the installed one, running the pytest files that drive the native boundary hardest
#      (SANITIZE_TESTS below; override with arguments).
# Any sanitizer report aborts the process, so a clean exit means no report. CI runs this script;
# it takes a few minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

echo "== engine C++ tests under ASan+UBSan (preset asan)"
cmake --preset asan "${GENERATOR[@]}" >/dev/null
cmake --build build/asan >/dev/null
ctest --preset asan

echo "== Python extension under ASan+UBSan (build/asan-py)"
cmake -S . -B build/asan-py "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DZETAGUARD_PYTHON=ON -DZETAGUARD_SANITIZE=ON \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build build/asan-py --target _core >/dev/null

# A package directory holding the current Python sources and the sanitized _core. The editable
# install puts a finder at the front of sys.meta_path that would load the normal _core, so a
# sitecustomize on PYTHONPATH removes it for these runs.
SITE=build/asan-py/site
rm -rf "$SITE"
mkdir -p "$SITE"
cp -r python/zetaguard "$SITE/zetaguard"
rm -f "$SITE"/zetaguard/_core*.so
cp build/asan-py/_core*.so "$SITE/zetaguard/"
cat >"$SITE/sitecustomize.py" <<'EOF'
import sys

sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
EOF

export PYTHONPATH="$PWD/$SITE"
# libasan first; libstdc++ too, because python itself does not link it: without it ASan's
# __cxa_throw interceptor finds no real function and aborts on the first C++ exception.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# Leaks: CPython and torch keep allocations alive at exit by design, so leak reports would be
# noise; use-after-free, overflows and UB abort the run.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# Fewer torch intra-op threads keep the instrumented run inside CI's time.
export OMP_NUM_THREADS=1

"$PY" - <<EOF
import zetaguard._core as c
assert c.__file__.startswith("$PWD/$SITE"), f"loaded the wrong _core: {c.__file__}"
print("sanitized extension:", c.__file__)
EOF

SANITIZE_TESTS=(tests/test_bad_inputs.py tests/test_fuzz_boundary.py tests/test_resume_exact.py)
if [ "$#" -gt 0 ]; then SANITIZE_TESTS=("$@"); fi
# --capture=sys: sanitizer reports go to file descriptor 2, which must reach the log.
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "${SANITIZE_TESTS[@]}"

echo "== fuzzing the native boundary under the sanitizers"
"$PY" scripts/fuzz.py --runs 2000 --driver random
# Tensors changed behind the torch adapter's cached addresses between monitor() calls.
"$PY" scripts/fuzz.py --runs 400 --driver random --case mutate --seed 1
echo "sanitizers: clean"
