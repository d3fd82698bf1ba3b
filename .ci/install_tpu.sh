#!/usr/bin/env bash
# Install libtpu for the `tpu_aot` tests (ahead-of-time compiles of the TPU kernels for virtual v5e/v6e chips).
#
# libtpu goes into .venv-tpu/, a `pip install --target` directory (git-ignored), not into the main environment:
# only the subprocesses started by tests/kernels/test_tpu_aot.py put it on PYTHONPATH, so every other test (and
# `import jax` in general) never sees a TPU plugin. The version is the one the installed jax pins for its [tpu]
# extra, so the compiler always matches jax. About 700 MB; takes seconds from a local wheel cache.
#
# Usage: .ci/install_tpu.sh            (PYTHON=/path/to/python to pick the interpreter; default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
TARGET=.venv-tpu

SPEC=$("$PYTHON" - <<'PY'
import importlib.metadata as metadata

for requirement in metadata.requires("jax") or []:
    name, _, marker = requirement.partition(";")
    if name.strip().startswith("libtpu") and '"tpu"' in marker:
        print(name.strip())
        break
else:
    raise SystemExit("the installed jax declares no libtpu requirement for its [tpu] extra")
PY
)

rm -rf "$TARGET"
"$PYTHON" -m pip install --quiet --no-deps --target "$TARGET" "$SPEC"
PYTHONPATH="$TARGET" "$PYTHON" -c "
from jax.experimental import topologies
topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')
" >/dev/null 2>&1 || { echo "libtpu installed in $TARGET but cannot build a v5e topology" >&2; exit 1; }
echo "installed $SPEC into $TARGET"
