#!/usr/bin/env bash
# One prepared GPU check of the batching engine: all four benchmarks with --device cuda, small sizes.
# Run from the repository root on a machine with a CUDA GPU and matcalc installed:
#     bash benchmarks/gpu_check.sh            (about 5-8 minutes on one modern GPU)
# Everything it prints goes to ${OUT:-benchmarks/gpu_results}/gpu_check.log as well; copy the RESULT
# lines and the "peak CUDA memory ... MiB/atom" line into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")"
OUTDIR="${OUT:-gpu_results}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
PY="${PYTHON:-python}"
export PYTHONWARNINGS=ignore
{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
  # 1. single points: hcmof cells (issue size), then MOF-5-sized cells (the >= 10x GPU target)
  timeout 600 "$PY" bench_single_points.py --device cuda --n 64 --repeat 2
  timeout 600 "$PY" bench_single_points.py --device cuda --n 64 --repeat 2 --structures MOF-5
  # 2. relaxation, "fast" preset: small MOFs, then MOF-5-sized
  timeout 600 "$PY" bench_relax.py --device cuda --n 16 --repeat 1
  timeout 600 "$PY" bench_relax.py --device cuda --n 16 --repeat 1 --structures MOF-5
  # 3. heat capacity of Zn-MOF-74 (54 atoms, 1x1x1)
  timeout 600 "$PY" bench_heat_capacity.py --device cuda --repeat 2
  # 4. overhead
  timeout 600 "$PY" bench_overhead.py --device cuda --n 4 --repeat 2
  echo "== done $(date -u +%Y-%m-%dT%H:%MZ)"
} 2>&1 | grep -v -E "UserWarning|tensor.detach|volumes = torch.tensor" | tee "$LOG"
