#!/usr/bin/env bash
# bench_core and bench_model on a GPU, in one command of at most 8 minutes.
#
# For a machine where JAX (with its CUDA plugin), flax, optax, equinox and torch are
# preinstalled and this repository is a plain copy of the source: nothing is pip-installed
# except, optionally, wheels carried in benchmarks/out/wheels/ (git-ignored; JAXBN_WHEELS names
# another folder). dm-haiku and its jmp dependency are not on the lent machines' image; fetch
# them here (pure Python) with
#   python -m pip download --no-deps --only-binary=:all: dm-haiku==0.0.17 jmp==0.0.4 \
#     -d benchmarks/out/wheels
# and carry that folder; without them the haiku rows record "No module named 'haiku'". jaxbn is
# imported from the source tree (PYTHONPATH=.).
#
#   bash benchmarks/run_gpu.sh                    # on the GPU machine, from the repository root
#   JAXBN_GPU_SMOKE=1 bash benchmarks/run_gpu.sh  # tiny shapes, any machine (CPU too): checks
#                                                 # that the script runs end to end (~2 min)
#
# Output: benchmarks/results/bench_core_gpu.json and bench_model_gpu.json ($OUT/ instead when
# OUT is set, e.g. by the device tool that returns files under $OUT), plus run_gpu.log and
# gpu.txt (nvidia-smi). Each JSON records the card (nvidia-smi --query-gpu=name,memory.total
# and jax.devices()[0].device_kind, in meta.accelerator) and its tables the share of HBM
# bandwidth achieved: minimum bytes moved (bench_core) or XLA's bytes accessed per step
# (bench_model) / time / datasheet peak. The peaks are _common.HBM_PEAK, keyed by device_kind
# (NVIDIA datasheets: H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8, A100 80GB SXM 2.039, ...;
# assumption: device_kind names the card as nvidia-smi does). bench_core also measures the
# card's copy bandwidth (a 1 GiB in-place update, bytes read + written), which is the ceiling
# a kernel can actually reach (~90% of the datasheet figure).
#
# Provenance: a copy without .git cannot tell whether its code was committed. Before the run,
# on the checkout the copy is made from, `python benchmarks/_results.py --source-env` prints
# JAXBN_SOURCE_* assignments; put them in front of this command so that the JSON records the
# commit (render_results.py refuses results from uncommitted code).
#
# Time budget (480 s): bench_core <= 300 s, bench_model <= 150 s, the rest is start-up; a part
# that fails or runs over leaves a log line and the other part still runs. If bench_core dies
# with torch in the process (CUDA libraries of torch and JAX in one process), it is rerun once
# without torch in the time left.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/run_gpu.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
left() { echo $(( 470 - ($(date +%s) - start) )); }

wheels="${JAXBN_WHEELS:-benchmarks/out/wheels}"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jaxbn-site "$wheels"/*.whl >>"$log" 2>&1 \
    && say "# installed carried wheels: $(cd "$wheels" && ls ./*.whl | tr '\n' ' ')"
  export PYTHONPATH="/tmp/jaxbn-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
# JAX takes GPU memory as it needs it, so that torch (same process) gets some too.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

smoke="${JAXBN_GPU_SMOKE:-0}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  >"$out/gpu.txt" 2>&1 || echo "nvidia-smi: not available" >"$out/gpu.txt"
say "# $(tr '\n' ' ' <"$out/gpu.txt")"
platform=$(python3 -c 'import jax; d = jax.devices()[0]
print(d.platform, "|", d.device_kind, "|", jax.__version__)' 2>>"$log")
say "# jax devices: $platform"
if [ "$smoke" != "1" ] && [[ "$platform" != gpu* && "$platform" != cuda* ]]; then
  say "ERROR: JAX sees no GPU ($platform); set JAXBN_GPU_SMOKE=1 for a CPU smoke run."
  exit 2
fi

if [ "$smoke" = "1" ]; then
  core_args=(--quick --reps 2 --deadline 200)
  model_args=(--quick --deadline 100)
else
  # The default shapes (small (32, 8, 8, 16) included) plus one past the L2 cache in float32
  # and bfloat16 (205 / 103 MB); 30 rounds. No CNN compile table (XLA:GPU autotunes every
  # convolution of its 20-layer CNN: minutes; bench_model reports temp memory and compile time
  # on the GPU). --deadline: shapes that would not finish in time are skipped and named.
  core_args=(--reps 30 --extra-shapes 256x56x56x64 --no-cnn --deadline 220)
  # A ResNet with 64 filters at batch 256 (32x32): enough work per step for a GPU.
  model_args=(--batch 256 --filters 64 --reps 30 --compile-reps 1 --deadline 110)
fi

run_part() {  # run_part SECONDS NAME ARGS...: one benchmark under a time limit
  local limit=$1 name=$2; shift 2
  say "# $(date -u +%H:%M:%S) $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" python3 "$@" --out "$out" >>"$log" 2>&1
  local rc=$?
  say "# $name rc=$rc after $(( $(date +%s) - start )) s"
  return $rc
}

core_limit=$(( $(left) - 160 )); [ "$core_limit" -gt 300 ] && core_limit=300
if ! run_part "$core_limit" bench_core benchmarks/bench_core.py "${core_args[@]}" \
    --name bench_core_gpu; then
  if [ ! -s "$out/bench_core_gpu.json" ] && [ "$(left)" -gt 250 ]; then
    run_part $(( $(left) - 160 )) "bench_core (no torch)" benchmarks/bench_core.py \
      "${core_args[@]}" --no-torch --name bench_core_gpu
  fi
fi
model_limit=$(left); [ "$model_limit" -gt 150 ] && model_limit=150
if [ "$model_limit" -gt 20 ]; then
  run_part "$model_limit" bench_model benchmarks/bench_model.py "${model_args[@]}" \
    --name bench_model_gpu
else
  say "# bench_model skipped: no time left"
fi

# The reply of a device call carries the end of the output: a short summary last.
python3 - "$out" <<'EOF' 2>&1 | tee -a "$log"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("bench_core_gpu", "bench_model_gpu"):
  p = out / f"{name}.json"
  if not p.exists():
    print(f"{name}: no result"); continue
  d = json.loads(p.read_text())
  m = d["meta"]
  print(f"{name}: {m.get('platform')} {m.get('accelerator')} code_dirty={m.get('code_dirty')}")
  t = d["tables"][0]
  c = t["columns"]
  keep = [k for k in ("shape", "dtype", "pass", "impl", "BN", "devices", "median ms", "step ms",
                      "per-round ratio to flax.linen (median)",
                      "per-round step ratio to flax (median)", "% of roofline",
                      "% of HBM peak", "error") if k in c]
  print(" | ".join(keep))
  for r in t["rows"]:
    row = dict(zip(c, r))
    impl = str(row.get("impl"))
    if name == "bench_core_gpu" and impl not in ("jaxbn", "flax.linen") \
        and not impl.startswith("torch"):
      continue
    print(" | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keep))
EOF
say "# run_gpu.sh done in $(( $(date +%s) - start )) s; files in $out"
