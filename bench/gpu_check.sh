#!/usr/bin/env bash
# One command for the GPU machine (H200): peer wheels -> builds -> GPU tests -> benchmark ->
# table. Every step has a time cap; the whole run stays under ~6 minutes.
#
#   bash bench/gpu_check.sh OUTDIR            # on the GPU machine, repo root as cwd or not
#   bash bench/gpu_check.sh OUTDIR --dry-run  # on CPU (CI): arguments, discovery, CSVs
#
# Wheels: .whl/*.whl (liger-kernel and trl, pure Python) are installed into /tmp/site, never
# over the machine's packages (`pip download --no-deps liger-kernel==0.8.5 trl==1.16.0 -d .whl`;
# trl also needs accelerate and datasets: bring those wheels, and datasets' own dependencies,
# if the machine lacks them, else the trl provider is skipped with the import error); .whl/test/*.whl (pytest, hypothesis and their deps) only if the
# machine lacks pytest or hypothesis. kdkernels itself runs from the checkout (PYTHONPATH).
# The `-m gpu` step includes the cross-tokenizer loss on CUDA and `kdk serve-teacher --device cuda`
# with the hidden-mode trainer (tests/test_train_served.py): the latter needs the [serve] wheels
# (fastapi, starlette, uvicorn, pydantic, pydantic-core, anyio, h11, annotated-types,
# typing-inspection, sniffio) in .whl/ when the machine lacks them.
# Builds: `python -m kdkernels.info` compiles the C++/CUDA extensions (MAX_JOBS=16) in the
# background while the Triton tests run; later steps only load the cache (KDKERNELS_NO_BUILD).
# Benchmarks: bench/loss.py --device cuda (row kernels vs copy, then the dense loss's providers;
# gpu_bench.csv, gpu_rowops.csv, gpu_env.json, summary.txt) and bench/loss.py --device cuda
# --loss topk (gpu_topk.csv).
# Output in OUTDIR: gpu_check.log, build.log, test_triton.log, test_gpu.log, bench.log,
# bench_topk.log, gpu_bench.csv, gpu_rowops.csv, gpu_topk.csv, gpu_env.json, summary.txt. Exit
# status: 0 when every step passed, else the first failing step's status (the table is printed
# either way).
# Env: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 345).
set -uo pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
DRY=0
if [[ $# -eq 2 ]]; then
    [[ $2 == --dry-run ]] || usage
    DRY=1
fi
[[ $OUT == --* ]] && usage
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
SITE=/tmp/site
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1

# The Triton backend's test files (step c1, all their tests; step c2 skips them).
TRITON_TESTS=(tests/test_triton_backend.py tests/test_student_rows_triton.py)
# The top-k providers timed on the GPU (bench/topk.py names them).
TOPK_PROVIDERS=(floor topk_bucket topk_zero naive_topk)

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-345}))
STATUS=0
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for later steps.
cap() {
    local want=$1 left=$(( DEADLINE - $(date +%s) - $2 ))
    (( left < want )) && want=$left
    (( want < 10 )) && want=10
    echo "$want"
}
fail() { (( STATUS == 0 )) && STATUS=$1; }
: > "$OUT/gpu_check.log"
rm -f "$OUT/summary.txt" "$OUT/build.rc"  # never show a previous run's results

if (( DRY )); then
    log "dry run in $ROOT: no installs, builds, tests or GPU timing"
    shopt -s nullglob
    wheels=(.whl/*.whl)
    log "would install into $SITE: ${wheels[*]:-(no .whl/*.whl here: fetch liger-kernel and trl first)}"
    log "would build: $PY -m kdkernels.info ($( [[ -f kdkernels/info.py ]] && echo present \
        || echo 'missing: would fall back to registry.available()'))"
    log "would test: pytest ${TRITON_TESTS[*]}; pytest -m gpu tests"
    KDKERNELS_NO_BUILD=1 timeout 60 "$PY" bench/loss.py --device cuda --loss topk \
        --providers "${TOPK_PROVIDERS[@]}" --out "$OUT" --dry-run > "$OUT/bench_topk.log" 2>&1 \
        || fail $?
    log "would bench top-k: bench/loss.py --loss topk ($(wc -l < "$OUT/bench_topk.log") rows)"
    KDKERNELS_NO_BUILD=1 timeout 120 "$PY" bench/loss.py --device cuda --out "$OUT" --dry-run \
        > "$OUT/bench.log" 2>&1 || fail $?
    cat "$OUT/bench.log"
    log "dry run done (status $STATUS)"
    exit $STATUS
fi

log "repo $ROOT, out $OUT, budget $(( DEADLINE - START )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | tee -a "$OUT/gpu_check.log"
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 \
    | tee -a "$OUT/gpu_check.log"

# (a) peer wheels into /tmp/site (pure-Python wheels: unzipping is the fallback without pip)
install_wheels() {
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$@" >> "$OUT/gpu_check.log" 2>&1 && return 0
    log "pip install failed; unzipping $* into $SITE"
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in \
sys.argv[2:]]" "$SITE" "$@" >> "$OUT/gpu_check.log" 2>&1
}
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
    install_wheels "${wheels[@]}" || { log "wheel install failed"; fail 3; }
else
    log "no .whl/*.whl: the Liger (and, without trl here, the trl) providers will be skipped"
fi
need=()
"$PY" -c "import pytest" 2>/dev/null \
    || need+=(.whl/test/pytest-*.whl .whl/test/pluggy-*.whl .whl/test/iniconfig-*.whl \
              .whl/test/packaging-*.whl .whl/test/pygments-*.whl)
"$PY" -c "import hypothesis" 2>/dev/null \
    || need+=(.whl/test/hypothesis-*.whl .whl/test/sortedcontainers-*.whl)
if (( ${#need[@]} )); then
    log "installing test wheels: ${need[*]}"
    install_wheels "${need[@]}" || { log "test wheel install failed"; fail 3; }
fi
"$PY" -c "import liger_kernel, pytest; print('liger_kernel', liger_kernel.__file__)" 2>&1 \
    | tee -a "$OUT/gpu_check.log"
"$PY" -c "from trl.trainer.distillation_trainer import _chunked_divergence_loss; import trl; \
print('trl', trl.__version__, trl.__file__)" 2>&1 | tail -1 | tee -a "$OUT/gpu_check.log"

# (b) builds, in the background while the Triton tests run
if [[ -f kdkernels/info.py ]]; then
    build_cmd=("$PY" -m kdkernels.info)
else
    build_cmd=("$PY" -c "from kdkernels.backends import registry; print(registry.available())")
fi
log "build: ${build_cmd[*]}"
( timeout "$(cap 200 150)" "${build_cmd[@]}" > "$OUT/build.log" 2>&1; echo $? > "$OUT/build.rc" ) &
BUILD_PID=$!

# (c1) the Triton backend's tests, compiled on the GPU. They need no extension: an empty
# extension cache keeps them away from the one being built.
log "tests: ${TRITON_TESTS[*]}"
KDKERNELS_NO_BUILD=1 KDKERNELS_CACHE_DIR=$(mktemp -d) timeout "$(cap 150 190)" "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="" "${TRITON_TESTS[@]}" 2>&1 | tee "$OUT/test_triton.log" | tail -25
rc=${PIPESTATUS[0]}; log "triton tests: status $rc"; (( rc )) && fail 4

wait "$BUILD_PID"
log "build: status $(cat "$OUT/build.rc" 2>/dev/null || echo '?')"
tail -20 "$OUT/build.log" | tee -a "$OUT/gpu_check.log"
[[ $(cat "$OUT/build.rc" 2>/dev/null) == 0 ]] || fail 5

# (d) benchmark
bench_cap=$(cap 175 55)
log "bench: cap $bench_cap s"
KDKERNELS_NO_BUILD=1 timeout "$bench_cap" "$PY" bench/loss.py --device cuda --out "$OUT" \
    --budget-s $(( bench_cap > 35 ? bench_cap - 25 : 10 )) > "$OUT/bench.log" 2>&1
rc=$?; log "bench: status $rc"; (( rc )) && { tail -30 "$OUT/bench.log"; fail 6; }

# (d2) the sparse-teacher (top-k) loss vs its floor and the naive top-k loss: gpu_topk.csv
log "bench: top-k"
topk_cap=$(cap 60 40)
KDKERNELS_NO_BUILD=1 timeout "$topk_cap" "$PY" bench/loss.py --device cuda --loss topk \
    --providers "${TOPK_PROVIDERS[@]}" --out "$OUT" --budget-s $(( topk_cap > 20 ? topk_cap - 10 : 10 )) \
    > "$OUT/bench_topk.log" 2>&1
rc=$?; log "bench top-k: status $rc"; (( rc )) && { tail -20 "$OUT/bench_topk.log"; fail 6; }

# (c2) every other GPU-marked test
log "tests: pytest -m gpu tests (others)"
KDKERNELS_NO_BUILD=1 timeout "$(cap 120 8)" "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="" -m gpu --continue-on-collection-errors \
    "${TRITON_TESTS[@]/#/--ignore=}" tests 2>&1 | tee "$OUT/test_gpu.log" | tail -25
rc=${PIPESTATUS[0]}; log "gpu tests: status $rc"; (( rc && rc != 5 )) && fail 7

log "done in $(( $(date +%s) - START )) s, status $STATUS"
echo "---- tests ----"
echo "triton: $(tail -1 "$OUT/test_triton.log" 2>/dev/null)"
echo "gpu:    $(tail -1 "$OUT/test_gpu.log" 2>/dev/null)"
echo "build:  status $(cat "$OUT/build.rc" 2>/dev/null || echo '?')"
echo "---- bench (summary.txt) ----"
cat "$OUT/summary.txt" 2>/dev/null || { echo "no summary: see bench.log"; tail -20 "$OUT/bench.log"; }
exit $STATUS
