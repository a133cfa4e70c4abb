#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, torch and triton preinstalled and no network: build pyops in
# place for this GPU's architecture, run the CUDA-marked tests and the GPU benchmarks, and write
# logs and CSV to OUTDIR (default bench/out). Prints a short table last. Budget: 8 minutes.
#   bash bench/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$SECONDS
stage() { echo "== $1 ($((SECONDS - START)) s)"; }

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY" >&2
  exit 2
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYOPS_CUDA=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

stage "build (sm $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
if ! $PY -m pip install -e . --no-build-isolation --no-deps --no-index > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: build failed (full log: $OUT/build.log)" >&2
  exit 1
fi
$PY -m pyops info | tee "$OUT/info.txt"

stage "CUDA tests"
timeout 210 $PY -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
TESTS_RC=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
tail -1 "$OUT/tests.log"

stage "GPU benchmarks"
timeout 240 $PY -m pyops bench --device cuda --out "$OUT" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
[ $BENCH_RC -eq 0 ] || tail -20 "$OUT/bench.log"

stage "summary"
$PY - "$OUT" <<'PYEOF'
import csv, glob, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "*_cuda.csv"))):
    rows = list(csv.DictReader(open(path)))
    print(f"# {os.path.basename(path)} on {rows[0]['machine'] if rows else '?'}")
    cols = ["op", "mode", "shape", "dtype", "backend", "median_ms", "GB/s", "pct_copy_bw", "vs_eager", "vs_compile"]
    keep = [r for r in rows if r["backend"] not in ("torch eager", "torch.compile")]
    w = {c: max(len(c), *(len(r[c]) for r in keep)) for c in cols} if keep else {}
    print("  ".join(c.ljust(w[c]) for c in cols))
    for r in keep:
        print("  ".join(r[c].ljust(w[c]) for c in cols))
PYEOF
echo "tests rc=$TESTS_RC bench rc=$BENCH_RC, $((SECONDS - START)) s; logs and CSV in $OUT"
[ $TESTS_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
