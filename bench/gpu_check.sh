#!/usr/bin/env bash
# The GPU check: on a fresh machine with an NVIDIA GPU, torch and triton preinstalled and no network,
# build pyops in place for this GPU's architecture only, then run the CUDA-marked tests, the oracle
# check on CUDA, the quick GPU benchmarks family by family and the models' training step, each stage
# under its own time limit, the whole within GPU_CHECK_BUDGET seconds (default 690: a 12-minute slot
# with room to start). Every stage appends its output to its log in OUTDIR as it runs and the summary
# (OUTDIR/summary.md: stage, seconds, exit status, then the benchmark rows, also merged into
# OUTDIR/bench.csv) is rewritten after each stage, so a stage cut off by its limit keeps what finished
# before it and the rows it wrote. OUTDIR holds 7 files at most: gpu.txt, build.log, tests.log,
# check.log, bench.log, bench.csv, summary.md. Exit status: 0 when every stage passed, 1 otherwise,
# 2 when no GPU is visible.
#
#   bash bench/gpu_check.sh [OUTDIR]            (default bench/out/gpu_check)
#
# Environment: PYTHON (default python3); GPU_CHECK_BUDGET (seconds for the whole run);
# GPU_CHECK_LIMIT_<stage> (one stage's limit, e.g. GPU_CHECK_LIMIT_bench_conv=60);
# GPU_CHECK_COMPILE=1 (time the torch.compile baselines too: each costs a compile);
# GPU_CHECK_DRY_RUN=1 (no GPU needed: every command is a quick stand-in that writes fake rows, to
# check this script's flow; GPU_CHECK_DRY_HANG=stage,... makes those stand-ins hang past their limit
# and GPU_CHECK_DRY_FAIL=stage,... makes them fail).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/out/gpu_check}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
SUMMARY_PY=$PY
BUDGET=${GPU_CHECK_BUDGET:-690}
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
BENCH_DIR=$WORK/bench
STAGES=$WORK/stages.tsv
: > "$STAGES"
rm -f "$OUTDIR"/{gpu.txt,build.log,tests.log,check.log,bench.log,bench.csv,summary.md}

# ---- the stand-in for python under GPU_CHECK_DRY_RUN=1 ----------------------------------------------
write_stand_in() {
  cat > "$WORK/python" <<'STANDIN'
#!/usr/bin/env bash
# gpu_check.sh's stand-in for python (GPU_CHECK_DRY_RUN=1): each stage quick, benchmark rows fake.
stage=other out="" family=""
prev=""
for a in "$@"; do
  case "$prev" in --out) out=$a ;; --family) family=$a ;; esac
  prev=$a
done
case " $* " in
  *" setup.py build_ext "*) stage=build ;;
  *" -m pytest "*) stage=tests ;;
  *" -m pyops check "*) stage=check ;;
  *" -m pyops info "*) stage=info ;;
  *" -m pyops bench "*) stage=bench_$family ;;
esac
[[ ",${GPU_CHECK_DRY_HANG:-}," == *",$stage,"* ]] && exec sleep 1000
if [[ ",${GPU_CHECK_DRY_FAIL:-}," == *",$stage,"* ]]; then echo "[dry run] $stage fails"; exit 1; fi
case $stage in
  tests) echo "[dry run] pytest $*"; echo "7 passed, 2 skipped in 0.10s" ;;
  bench_*)
    mkdir -p "$out"
    {
      echo "family,op,mode,shape,dtype,device,backend,median_ms,GB/s,vs_eager,pct_copy_bw,machine"
      echo "$family,${family}_op,fwd,64x1024,float32,cuda,torch eager,0.5000,1000.0,,,dry run"
      echo "$family,${family}_op,fwd,64x1024,float32,cuda,native,0.2500,2000.0,2.00,67,dry run"
      echo "$family,${family}_op,fwd,64x1024,float32,cuda,triton,0.4000,1250.0,1.25,42,dry run"
    } > "$out/${family}_cuda.csv"
    echo "[dry run] bench $family" ;;
  *) echo "[dry run] $stage: $*" ;;
esac
STANDIN
  chmod +x "$WORK/python"
}

if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
  write_stand_in
  PY=$WORK/python
  CAP=9.0
  echo "gpu_check: dry run (GPU_CHECK_DRY_RUN=1): stand-ins for every command" | tee "$OUTDIR/gpu.txt"
else
  if ! CAP=$($PY -c "import torch, sys; sys.exit(1) if not torch.cuda.is_available() else print('%d.%d' % torch.cuda.get_device_capability())"); then
    echo "gpu_check: no CUDA GPU visible to $PY" >&2
    exit 2
  fi
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "cores $(nproc), arch $CAP"
  } > "$OUTDIR/gpu.txt" 2>&1
  cat "$OUTDIR/gpu.txt"
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYOPS_CUDA=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# ---- the summary, rewritten after every stage --------------------------------------------------------
summarize() {
  $SUMMARY_PY - "$OUTDIR" "$BENCH_DIR" "$STAGES" "$((SECONDS - START))" "$BUDGET" <<'PYEOF'
import csv, glob, os, sys

out, bench_dir, stages, elapsed, budget = sys.argv[1:6]
lines = [f"# GPU check: {elapsed} s of a {budget} s budget", ""]
gpu = os.path.join(out, "gpu.txt")
if os.path.exists(gpu):  # the machine (pyops info, appended below it, stays in the file)
    head = open(gpu).read().split("\n== info")[0].strip()
    lines += ["```", head, "```", ""]
lines += ["| stage | seconds | limit s | rc | result |", "|---|---|---|---|---|"]
for line in open(stages):
    name, seconds, limit, rc, note = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    lines.append(f"| {name} | {seconds} | {limit} | {rc} | {note} |")
rows, fields = [], []
for path in sorted(glob.glob(os.path.join(bench_dir, "*_cuda.csv"))):
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append(row)
            fields += [k for k in row if k not in fields]
if rows:
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    ours = [r for r in rows if not r.get("backend", "").startswith("torch")]
    cols = ["family", "op", "mode", "shape", "dtype", "backend", "median_ms", "GB/s", "pct_copy_bw"]
    cols += [c for c in fields if c.startswith("vs_")]
    lines += ["", f"Benchmark rows (pyops backends; {len(rows) - len(ours)} torch baseline rows in bench.csv):", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in ours]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
PYEOF
}

# note for a finished stage: a timeout; a benchmark's rows; else the last line of a test report
stage_note() {
  local rc=$1 log=$2 name=$3 note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="timed out"
  if [[ $name == bench_* ]]; then
    local csv=$BENCH_DIR/${name#bench_}_cuda.csv rows=0
    [ -f "$csv" ] && rows=$(($(wc -l < "$csv") - 1))
    note="${note:+$note, }$rows rows"
  elif [ -z "$note" ]; then
    note=$(tail -n 40 "$log" | grep -E "(passed|failed|error|skipped)( |,|$)" | tail -n 1 | tr -d '=|\t' \
      | sed 's/^ *//' | cut -c1-160)
  fi
  echo "$note"
}

FAILED=0
# run_stage NAME LIMIT LOG COMMAND...: COMMAND under min(LIMIT, what the budget leaves), its output
# appended to OUTDIR/LOG, one line in the stage table, the summary rewritten.
run_stage() {
  local name=$1 limit=$2 log=$OUTDIR/$3
  shift 3
  local var="GPU_CHECK_LIMIT_${name//[^A-Za-z0-9_]/_}"
  limit=${!var:-$limit}
  local left=$((BUDGET - (SECONDS - START) - 5))
  if [ "$left" -lt 5 ]; then
    printf '%s\t0\t%s\t-\tskipped: the budget is spent\n' "$name" "$limit" >> "$STAGES"
    FAILED=1
    summarize
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit $limit s; $((SECONDS - START)) s in)"
  echo "== $name: $*" >> "$log"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local note
  note=$(stage_note "$rc" "$log" "$name")
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$limit" "$rc" "$note" >> "$STAGES"
  echo "   rc $rc in $((SECONDS - t0)) s${note:+: $note}"
  [ "$rc" -eq 0 ] || FAILED=1
  summarize
  return "$rc"
}

skip_stage() {
  printf '%s\t0\t-\t-\tskipped: %s\n' "$1" "$2" >> "$STAGES"
  FAILED=1
}

# ---- the stages ----------------------------------------------------------------------------------------
if run_stage build 200 build.log $PY setup.py build_ext --inplace; then
  run_stage info 15 gpu.txt $PY -m pyops info
  XDIST=()
  if [ -z "${GPU_CHECK_DRY_RUN:-}" ] && $PY -c "import xdist" 2>/dev/null; then
    XDIST=(-n 8 --dist loadgroup)  # the 2^31-element tests share a group: one worker runs them in turn
  fi
  run_stage tests 170 tests.log $PY -m pytest -q -rfE -m cuda -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests
  run_stage check 55 check.log $PY -m pyops check --device cuda
  COMPILE=(--no-compile)
  [ -n "${GPU_CHECK_COMPILE:-}" ] && COMPILE=()
  for spec in activation:35 batch_norm:35 conv:40 loss:30 optim:30 overhead:20 models:40; do
    family=${spec%%:*}
    run_stage "bench_$family" "${spec##*:}" bench.log \
      $PY -m pyops bench --quick --device cuda --family "$family" --out "$BENCH_DIR" ${COMPILE[@]+"${COMPILE[@]}"}
  done
else
  for stage in info tests check bench_activation bench_batch_norm bench_conv bench_loss bench_optim \
    bench_overhead bench_models; do
    skip_stage "$stage" "the build failed"
  done
  tail -n 30 "$OUTDIR/build.log"
fi
summarize
echo
cat "$OUTDIR/summary.md"
echo "gpu_check: $((SECONDS - START)) s; logs, bench.csv and summary.md in $OUTDIR"
exit $FAILED
