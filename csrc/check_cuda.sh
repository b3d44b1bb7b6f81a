#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: every csrc/cuda/*.cu file for sm_80 and sm_90 (nvcc -c),
# warnings as errors, with torch's half/bfloat16 operator-disabling defines (the flags
# torch.utils.cpp_extension adds), and for sm_80 also without them. If a Python with torch is available, the torch binding
# (csrc/cuda/binding.cpp, which includes no CUDA header) is also syntax-checked against torch's headers.
# Exits non-zero on the first failure. Needs nvcc on PATH, in $CUDA_HOME/bin or /usr/local/cuda*/bin.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

nvcc_bin="$(command -v nvcc || true)"
if [[ -z "${nvcc_bin}" && -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc_bin="${CUDA_HOME}/bin/nvcc"
fi
if [[ -z "${nvcc_bin}" ]]; then
  for candidate in /usr/local/cuda*/bin/nvcc; do
    if [[ -x "${candidate}" ]]; then
      nvcc_bin="${candidate}"
      break
    fi
  done
fi
if [[ -z "${nvcc_bin}" ]]; then
  echo "check_cuda.sh: nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)" >&2
  exit 2
fi

out="$(mktemp -d)"
trap 'rm -rf "${out}"' EXIT

torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
               -D__CUDA_NO_HALF2_OPERATORS__)
echo "check_cuda.sh: $("${nvcc_bin}" --version | tail -n 1)"
jobs_max="${CHECK_CUDA_JOBS:-$(nproc 2>/dev/null || echo 2)}"

# One compile: prints ok/FAIL and returns nvcc's status.
compile() {
  local arch="$1" variant="$2" source="$3"
  local defines=()
  if [[ "${variant}" == torch-defines ]]; then
    defines=("${torch_defines[@]}")
  fi
  local log="${out}/$(basename "${source}" .cu)-${arch}-${variant}.log"
  if "${nvcc_bin}" -c -std=c++17 -O3 -arch="${arch}" -Werror all-warnings -Xcompiler -Wall,-Wextra \
      "${defines[@]}" -I"${here}" -o "${log%.log}.o" "${source}" >"${log}" 2>&1; then
    echo "  ok    ${arch} ${variant} $(basename "${source}")"
  else
    cat "${log}" >&2
    echo "  FAIL  ${arch} ${variant} $(basename "${source}")" >&2
    return 1
  fi
}

status=0
pids=()
# Both targets with the defines torch's build uses; sm_80 also without them (standalone use).
for target in sm_80:torch-defines sm_90:torch-defines sm_80:plain; do
  arch="${target%%:*}"
  variant="${target##*:}"
  for source in "${here}"/cuda/*.cu; do
    while (( $(jobs -rp | wc -l) >= jobs_max )); do
      wait -n || status=1
    done
    compile "${arch}" "${variant}" "${source}" &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do
  wait "${pid}" || status=1
done

python_bin="${PYTHON:-python3}"
if torch_include="$("${python_bin}" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  includes=()
  for path in ${torch_include}; do
    includes+=(-isystem "${path}")
  done
  if "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Wextra -Werror "${includes[@]}" -I"${here}" \
      "${here}/cuda/binding.cpp"; then
    echo "  ok    binding.cpp (syntax, torch headers)"
  else
    echo "  FAIL  binding.cpp (syntax, torch headers)" >&2
    status=1
  fi
else
  echo "  skip  binding.cpp (no Python with torch)"
fi
exit "${status}"
