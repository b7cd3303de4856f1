#!/usr/bin/env bash
# README command 1: install everything on a fresh machine, then run the demo fine-tune (before/after exact match).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m tunelab demo "$@"
