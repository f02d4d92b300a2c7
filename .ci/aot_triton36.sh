#!/usr/bin/env bash
# AOT-compile fusednn's kernels for sm_90 with triton 3.6, the version on the lent GPU machines.
#
# Why a second virtualenv: triton 3.6's GPU compiler is stricter than 3.9's (e.g. it refuses tl.dot
# operands under 16), and this machine's main venv has 3.9. Only the `aot` tests run here, with
# TRITON_INTERPRET=0: triton 3.6's interpreter breaks on numpy >= 2.4 (triton-lang/triton#9171), so
# nothing in this venv may run the interpreter.
#
# The venv is .venv-triton36 in the repo root, rebuilt only when pyproject.toml or the pins below change.
# Usage: bash .ci/aot_triton36.sh [extra pytest args]; exits non-zero when any AOT test fails.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv-triton36"
# the torch wheel on disk is cp311
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
# torch 2.13.0: pip picks the CPU build shipped on this machine's disk (checked below: never a CUDA build).
PINS="torch==2.13.0 triton==3.6.0 numpy pytest hypothesis expecttest"
# expecttest: torch.testing._internal (op_db, module_db samples) imports it; collecting the test modules needs it.
KEY=$({ cat pyproject.toml; echo "$PINS"; } | sha256sum | cut -c1-16)

start=$(date +%s)
if [[ -f "$VENV/.fusednn-key" && "$(cat "$VENV/.fusednn-key")" == "$KEY" ]]; then
    echo "aot_triton36: reusing $VENV (key $KEY)"
else
    echo "aot_triton36: building $VENV (key $KEY)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/python" -W ignore - <<'EOF'
import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"aot_triton36: pip installed a CUDA build of torch ({torch.__version__}); expected the CPU build")
EOF
    "$VENV/bin/pip" install -q triton==3.6.0 numpy pytest hypothesis expecttest
    "$VENV/bin/pip" install -q --no-deps -e .
    echo "$KEY" > "$VENV/.fusednn-key"
fi
built=$(date +%s)

"$VENV/bin/python" -c 'import torch, triton, numpy; print(f"aot_triton36: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")'

status=0
TRITON_INTERPRET=0 "$VENV/bin/python" -m pytest -m aot -q -p no:cacheprovider tests/ "$@" || status=$?
end=$(date +%s)
echo "aot_triton36: venv $((built - start)) s, tests $((end - built)) s, exit $status"
exit $status
