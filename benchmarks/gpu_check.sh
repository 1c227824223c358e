#!/usr/bin/env bash
# One prepared GPU check of the batching engine and the batched stepping, small sizes, one run.
# Run from the repository root on a machine with a CUDA GPU and matcalc installed:
#     bash benchmarks/gpu_check.sh            (about 6-9 minutes on one modern GPU)
# Everything it prints goes to ${OUT:-benchmarks/gpu_results}/gpu_check.log as well; copy the RESULT lines,
# the "host ms per structure-step" lines, the "device utilisation" lines and the "peak CUDA memory ...
# MiB/atom" line into benchmarks/README.md.
#
# It answers the >= 10x question (single points and relaxations of MOF-5-sized cells vs the one-by-one ASE
# loop) and says where the time goes: host ms per structure-step (the CPU side of every step: optimizer,
# filter, graphs, hand-off; no GPU makes one process faster than ~1 / host time) and the device utilisation
# sampled by nvidia-smi while each benchmark runs.
set -uo pipefail
cd "$(dirname "$0")"
OUTDIR="${OUT:-gpu_results}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
PY="${PYTHON:-python}"
export PYTHONWARNINGS=ignore

# run NAME CMD...: run one benchmark with nvidia-smi sampling the device every 200 ms, then print the
# mean and peak utilisation and memory over the run
run() {
  local name="$1"; shift
  local samples="$OUTDIR/util_${name}.csv"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$samples" 2>/dev/null &
  local smi=$!
  timeout 600 "$@"
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  awk -F', *' -v n="$name" 'NF>=2 {u+=$1; if ($1>um) um=$1; if ($2>mm) mm=$2; k++}
       END {if (k) printf "device utilisation %s: mean %.0f %%, peak %d %%, peak memory %d MiB (%d samples)\n", n, u/k, um, mm, k;
            else print "device utilisation " n ": no nvidia-smi samples"}' "$samples"
}

{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
  echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
  # 0. host cost with an instant model (CPU only): the ceiling of steps per second per process
  timeout 300 "$PY" bench_host_cost.py --n 16 --steps 30 --repeat 1
  # 1. single points: hcmof cells, then MOF-5-sized cells (the >= 10x target)
  run sp_hcmof "$PY" bench_single_points.py --device cuda --n 64 --repeat 2
  run sp_mof5 "$PY" bench_single_points.py --device cuda --n 64 --repeat 2 --structures MOF-5
  # 2. relaxation, "fast" preset: small MOFs, then MOF-5-sized (host ms per structure-step printed per run)
  run relax_hcmof "$PY" bench_relax.py --device cuda --n 16 --repeat 1
  run relax_mof5 "$PY" bench_relax.py --device cuda --n 16 --repeat 1 --structures MOF-5
  # 3. heat capacity of Zn-MOF-74 (54 atoms, 1x1x1)
  run heat_capacity "$PY" bench_heat_capacity.py --device cuda --repeat 1
  # 4. overhead
  run overhead "$PY" bench_overhead.py --device cuda --n 4 --repeat 1
  # 5. Widom insertions (adsorption): 2000 CO2 into CALF-20, henry_coefficient vs the plain ASE loop
  run henry "$PY" bench_henry.py --device cuda --n 2000 --repeat 1
  echo "== done $(date -u +%Y-%m-%dT%H:%MZ)"
} 2>&1 | grep -v -E "UserWarning|tensor.detach|volumes = torch.tensor" | tee "$LOG"
