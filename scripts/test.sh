#!/usr/bin/env bash
# README command 2 (and what .ci/run runs): install the test dependencies, then run the test suite.
# Slow tests (minutes, the embedded model's full demo) are deselected; run them with: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
