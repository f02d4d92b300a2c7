#!/usr/bin/env bash
# One pass of GPU checks and benchmarks on a machine with an NVIDIA GPU and no network, whose python3
# already has torch and triton:  bash benchmarks/gpu_check.sh OUTDIR
#
# Phases (each under `timeout`, carved from one 460 s deadline; a failed phase is reported, the next runs):
#   env        nvidia-smi, python/torch/triton versions          -> OUTDIR/env.log, OUTDIR/nvidia-smi.txt
#   install    pip install --no-deps --no-build-isolation -e .   -> OUTDIR/install.log
#              (if that fails or does not import: a flat copy of the package in a temp dir, run from there)
#   info       fusednn info                                      -> OUTDIR/info.log
#   tests      python3 -m pytest -m gpu -q (incl. float16/bfloat16 autocast vs float64) -> OUTDIR/tests.log, tests.xml
#   bench_ieee benchmarks/run.py: all variants, batch 64/512/4096, strict fp32 -> OUTDIR/bench_ieee/
#   bench_tf32 the same in TF32                                  -> OUTDIR/bench_tf32/
# Then the phase table and a short results table are printed last (OUTDIR/summary.txt keeps both).
# Without a CUDA device every phase still runs or says why it skips (the benchmark then runs its tiny
# CPU configuration), so the script can be tried on a CPU machine.
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-460}  # phases end by then; the summary adds at most 30 s: within 8 minutes
START=$(date +%s)
PHASES=()

left() { echo $((START + TOTAL - $(date +%s))); }
# cap SECONDS RESERVE: a phase timeout of at most SECONDS that leaves RESERVE seconds for later phases
cap() { local l=$(($(left) - $2)); echo $(($1 < l ? $1 : l)); }

# phase NAME TIMEOUT CMD...: run CMD under timeout, output to OUTDIR/NAME.log, record the outcome
phase() {
    local name=$1 t=$2 t0 rc dt status
    shift 2
    if ((t < 10)); then
        PHASES+=("$(printf '%-11s SKIPPED: no time left' "$name")")
        echo "== $name: skipped, no time left"
        return 0
    fi
    echo "== $name (timeout ${t}s) > $OUT/$name.log"
    echo "\$ $*" >"$OUT/$name.log"
    t0=$(date +%s)
    timeout --kill-after=5 "$t" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMED OUT (limit ${t}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    PHASES+=("$(printf '%-11s %-24s %4ss' "$name" "$status" "$dt")")
    echo "   $name: $status in ${dt}s"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

# --- env ------------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv >>"$OUT/nvidia-smi.txt" 2>&1
else
    echo "nvidia-smi: not found (no NVIDIA driver on this machine)" >"$OUT/nvidia-smi.txt"
fi
phase env "$(cap 60 400)" "$PY" -c '
import os, platform, sys
import torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
    print("cudnn", torch.backends.cudnn.version())
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
'
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$CUDA" != 1 ]; then
    echo "   no CUDA device: GPU-marked tests will skip, the benchmark runs its CPU configuration (counts only)"
fi

# --- install --------------------------------------------------------------------------------------
install_cmd='
'"$PY"' -m pip install --no-deps --no-build-isolation -e . ||
'"$PY"' -m pip install --no-deps --no-build-isolation --break-system-packages -e .
'
phase install "$(cap 120 330)" bash -c "$install_cmd"
# The package maps fusednn.compiler -> compiler/ and fusednn.kernels -> kernels/: check it imports
# from here; if not, lay the package out flat in a temp dir and run everything from there.
if ! "$PY" -c 'import fusednn.compiler.configs, fusednn.kernels.sgd, fusednn.tools.bench, fusednn.step' >>"$OUT/install.log" 2>&1; then
    FLAT=$(mktemp -d)/fusednn-flat
    mkdir -p "$FLAT"
    cp -r fusednn "$FLAT/fusednn" && cp -r compiler "$FLAT/fusednn/compiler" && cp -r kernels "$FLAT/fusednn/kernels"
    cp -r tests benchmarks pyproject.toml "$FLAT/"
    cd "$FLAT" || exit 2
    export PYTHONPATH="$FLAT${PYTHONPATH:+:$PYTHONPATH}"  # for scripts run from benchmarks/
    echo "   fusednn does not import from the install; running from a flat copy in $FLAT" | tee -a "$OUT/install.log"
    PHASES+=("$(printf '%-11s %s' install+ "fallback: flat copy in $FLAT")")
fi

# --- info -----------------------------------------------------------------------------------------
if command -v fusednn >/dev/null 2>&1; then
    phase info "$(cap 60 300)" fusednn info
else
    phase info "$(cap 60 300)" "$PY" -m fusednn.tools.cli info
fi

# --- GPU-marked tests -----------------------------------------------------------------------------
if "$PY" -c 'import pytest' >/dev/null 2>&1; then
    phase tests "$(cap 180 250)" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$OUT/tests.xml" tests
else
    echo "pytest is not installed for $PY: GPU tests not run" >"$OUT/tests.log"
    PHASES+=("$(printf '%-11s %s' tests "NOT RUN: pytest is not installed")")
fi

# --- benchmark ------------------------------------------------------------------------------------
if [ "$CUDA" = 1 ]; then
    BATCHES=64,512,4096
    STEPS=200
else
    BATCHES=8
    STEPS=2
fi
t=$(cap 300 $(( ($(left) - 20) * 2 / 5 + 20 )))  # ieee gets ~60% of what is left
phase bench_ieee "$t" "$PY" benchmarks/run.py --out "$OUT/bench_ieee" --precision ieee --batch-sizes "$BATCHES" \
    --steps "$STEPS" --budget-s $((t - 15))
if [ "$CUDA" = 1 ]; then
    t=$(cap 300 20)
    phase bench_tf32 "$t" "$PY" benchmarks/run.py --out "$OUT/bench_tf32" --precision tf32 --batch-sizes "$BATCHES" \
        --steps "$STEPS" --budget-s $((t - 15))
else
    PHASES+=("$(printf '%-11s %s' bench_tf32 "SKIPPED: TF32 needs an NVIDIA GPU")")
fi

# --- summary (printed last) -----------------------------------------------------------------------
{
    echo
    echo "== gpu_check $(date -u +%FT%TZ), $(($(date +%s) - START)) s, repo $REPO @ $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [ "$CUDA" = 1 ]; then echo "device: $(grep '^gpu ' "$OUT/env.log" | head -n 1)"; else echo "device: no CUDA device (CPU run: GPU parts skipped)"; fi
    printf '%s\n' "${PHASES[@]}"
    if [ -f "$OUT/tests.log" ]; then
        echo "tests: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/tests.log" | tail -n 1)"
    fi
    timeout 15 "$PY" benchmarks/run.py --summarize "$OUT"/bench_*/bench.json --full >"$OUT/tables.txt" 2>&1
    timeout 15 "$PY" benchmarks/run.py --summarize "$OUT"/bench_*/bench.json 2>/dev/null ||
        echo "(no benchmark results to summarise)"
} | tee "$OUT/summary.txt"
exit 0
