#!/usr/bin/env bash
# The main job on a fresh machine, offline: a virtual environment (.venv), the torch pair we test with,
# titans-timm itself, then titans-timm-quickstart (arguments pass through, e.g. --seeds 5 --model vit_tiny_mal_simple).
# On x86_64 PyPI's torch 2.14.1 is a CUDA build: the environment takes about 5.6 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
python -m pip install -q -e .
exec titans-timm-quickstart "$@"
