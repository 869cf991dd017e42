#!/usr/bin/env bash
# Install vit_backbones with the OpenMMLab stack on a CPU machine (Python 3.11, pip reaching PyPI).
#
#   bash tools/install.sh            # torch 2.13.0, mmcv 2.1.0 (+CPU ops), mmdet 3.3.0, mmseg 1.2.2, test deps
#
# It installs into the Python that runs it ($PYTHON, default python3): activate a virtual environment
# first to keep the machine's own site-packages untouched (.ci/run does exactly that, in a new venv).
#
# mmcv 2.1.0 has no wheel on PyPI, so it is built from source once against torch and the wheel is
# cached in $VIT_BACKBONES_CACHE (default ~/.cache/vit_backbones), keyed by torch and Python version;
# later runs reuse the installed mmcv or the cached wheel and never rebuild.
#
# Each phase prints its wall time ([install] ... in N s) so a slow machine shows where the time went.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
MMCV_VERSION=2.1.0
CACHE=${VIT_BACKBONES_CACHE:-$HOME/.cache/vit_backbones}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
say() { echo "[install] $*"; }
phase_start() { PHASE_T0=$(date +%s); }
phase_end() { say "$1 in $(( $(date +%s) - PHASE_T0 )) s"; }

say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. torch, pinned and alone: with other requirements beside it pip may backtrack to a multi-GB CUDA build.
phase_start
if "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "torch $TORCH_VERSION already installed"
else
  say "installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi
phase_end "phase torch"

# 2. mmcv with its compiled ops (RoIAlign, NMS ... needed by Mask R-CNN), built once.
phase_start
if "$PY" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null; then
  say "mmcv $MMCV_VERSION with ops already installed"
else
  PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  WHEEL_DIR="$CACHE/wheels/torch-$TORCH_VERSION-$PYTAG"
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    say "building mmcv $MMCV_VERSION with CPU ops from source (once; 7 to 15 minutes on 2 cores)"
    # mmcv's setup.py is built with an old setuptools (69.5.1) while torch 2.13 requires setuptools >= 77:
    # build in a throw-away venv of its own with the same torch, so the target environment keeps its
    # setuptools. (Not --system-site-packages: from inside a venv that would see the base interpreter's
    # packages, not the venv's torch.)
    BUILD_TMP=$(mktemp -d)
    BUILD_VENV="$BUILD_TMP/venv"
    "$PY" -m venv "$BUILD_VENV"
    "$BUILD_VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
    "$BUILD_VENV/bin/python" -m pip install --disable-pip-version-check -q "setuptools==69.5.1" wheel ninja \
      numpy packaging 2>&1 | grep -v "dependency conflicts\|requires setuptools\|^ERROR: pip's dependency resolver" || true
    MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) "$BUILD_VENV/bin/python" -m pip wheel --disable-pip-version-check -q \
      --no-deps --no-build-isolation -w "$BUILD_TMP/out" "mmcv==$MMCV_VERSION"
    # publish the wheel to the cache only once it is complete (a killed build leaves no half wheel there)
    for whl in "$BUILD_TMP"/out/mmcv-"$MMCV_VERSION"-*.whl; do
      cp "$whl" "$WHEEL_DIR/.$(basename "$whl").tmp" && mv "$WHEEL_DIR/.$(basename "$whl").tmp" "$WHEEL_DIR/$(basename "$whl")"
    done
    rm -rf "$BUILD_TMP"
  else
    say "using cached mmcv wheel in $WHEEL_DIR"
  fi
  pip_install "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl
fi
phase_end "phase mmcv"

# 3. the package (editable) with detection, segmentation and test extras. Its dependencies carry what
#    mmdet / mmseg import without declaring it (ftfy, regex) and a setuptools that still has
#    pkg_resources (mmengine resolves mmdet:: / mmseg:: config bases through it).
phase_start
say "installing vit_backbones[det,seg,test,export]"
pip_install -e ".[det,seg,test,export]"
"$PY" -c "import mmcv.ops, mmdet, mmdet.models, mmseg, mmseg.models, vit_backbones; print('[install] ready: vit_backbones', vit_backbones.__version__, '| backbones:', ', '.join(vit_backbones.list_backbones()))"
phase_end "phase rest (mmdet, mmseg, test deps, vit_backbones)"
