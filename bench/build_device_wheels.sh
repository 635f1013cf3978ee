#!/usr/bin/env bash
# Builds what the lent GPU machine lacks (it has jax 0.11.2 CUDA, flax, optax, orbax, tensorboard,
# timm, torch; no tensorflow / tensorflow-datasets / clu / ml-collections / scikit-learn and no
# network): pure-Python wheels of ml-collections, clu and this package, wrapt (clu's one
# compiled dependency), and the digits arrays as dist/device_wheels/digits.npz (scikit-learn's
# bundled images, read by bench/device_check.py where scikit-learn is absent). Then prints the
# one command to run there. Usage (repository root): bash bench/build_device_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-/work/main/.venv/bin/python}"
WHEELS=dist/device_wheels
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" . "ml-collections>=1.0,<2" "clu>=0.0.12,<0.1"
rm -rf build adv_soups.egg-info  # what the wheel build leaves behind
for v in 3.10 3.11 3.12 3.13; do  # the GPU machine's Python is not known here: one per version
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --platform manylinux2014_x86_64 -d "$WHEELS" "wrapt>=1.14" || echo "no wrapt wheel for $v"
done
PYTHONPATH=$PWD "$PY" - <<'PYEOF'
import numpy as np
from adv_soups.data import digits
images, labels = digits.scaled_images()
np.savez_compressed("dist/device_wheels/digits.npz", images=images, labels=labels)
PYEOF
du -sh "$WHEELS"
cat <<MSG
Carry: $WHEELS (run tool: carry=["$WHEELS"]). Run there, from the repository root (< 10 minutes):
  pip install -q --no-deps --no-index --find-links $WHEELS --target /tmp/device_site adv_soups ml-collections clu wrapt && PYTHONPATH=\$PWD:/tmp/device_site python -m bench.device_check --out \$OUT/device_check.json
MSG
