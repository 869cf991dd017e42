#!/usr/bin/env bash
# Install vit_backbones with the OpenMMLab stack on a CPU machine (Python 3.11, pip reaching PyPI).
#
#   bash tools/install.sh            # torch 2.13.0, mmcv 2.1.0 (+CPU ops), mmdet 3.3.0, mmseg 1.2.2, test deps
#
# mmcv 2.1.0 has no wheel on PyPI, so it is built from source once against the installed torch and the
# wheel is cached in $VIT_BACKBONES_CACHE (default ~/.cache/vit_backbones), keyed by torch and Python
# version; later runs reuse the installed mmcv or the cached wheel and never rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
MMCV_VERSION=2.1.0
CACHE=${VIT_BACKBONES_CACHE:-$HOME/.cache/vit_backbones}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
say() { echo "[install] $*"; }

# 1. torch, pinned and alone: with other requirements beside it pip may backtrack to a multi-GB CUDA build.
if "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "torch $TORCH_VERSION already installed"
else
  say "installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi

# 2. mmcv with its compiled ops (RoIAlign, NMS ... needed by Mask R-CNN), built once.
if "$PY" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null; then
  say "mmcv $MMCV_VERSION with ops already installed"
else
  PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  WHEEL_DIR="$CACHE/wheels/torch-$TORCH_VERSION-$PYTAG"
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    say "building mmcv $MMCV_VERSION with CPU ops from source (once; 7 to 15 minutes on 2 cores)"
    # mmcv's setup.py imports pkg_resources (setuptools < 70) while torch 2.13 requires setuptools >= 77:
    # build in a throw-away venv that sees the installed torch but has its own old setuptools.
    BUILD_VENV=$(mktemp -d)/venv
    "$PY" -m venv --system-site-packages "$BUILD_VENV"
    "$BUILD_VENV/bin/python" -m pip install --disable-pip-version-check -q "setuptools==69.5.1" wheel ninja 2>&1 \
      | grep -v "dependency conflicts\|requires setuptools\|^ERROR: pip's dependency resolver" || true
    MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) "$BUILD_VENV/bin/python" -m pip wheel --disable-pip-version-check -q \
      --no-deps --no-build-isolation -w "$WHEEL_DIR" "mmcv==$MMCV_VERSION"
    rm -rf "$(dirname "$BUILD_VENV")"
  else
    say "using cached mmcv wheel in $WHEEL_DIR"
  fi
  pip_install "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl
fi

# 3. the package (editable) with detection, segmentation and test extras.
say "installing vit_backbones[det,seg,test]"
pip_install -e ".[det,seg,test]"
"$PY" -c "import mmcv.ops, mmdet, mmseg, vit_backbones; print('[install] ready: vit_backbones', vit_backbones.__version__, '| backbones:', ', '.join(vit_backbones.list_backbones()))"
