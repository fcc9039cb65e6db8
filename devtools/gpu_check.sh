#!/usr/bin/env bash
# GPU checks on an offline machine that has Python, PyTorch with CUDA and the usual scientific stack
# (a PyTorch CUDA image): installs the wheelhouse made by devtools/offline_wheels.py into a private
# folder, then runs, from the repository root,
#   1. the scoring benchmark on CUDA in bf16 (ours vs a bare batched forward vs one sample at a time),
#   2. the tiny flow with ray.use_gpu=true, one Ray Train worker, bf16 autocast,
#   3. the same with train.parallel_strategy=fsdp (rank 0's CPU weights sent into CUDA shards),
# writing logs, the benchmarks' JSON and the runs' reports into OUTDIR. About 6 minutes on one GPU.
#
#   devtools/gpu_check.sh OUTDIR [WHEELHOUSE]      # WHEELHOUSE defaults to .whl
#
# POCL_CHECK_DEVICE=cpu runs the same steps without a GPU (to rehearse the offline install);
# POCL_CHECK_STEPS (default "scoring flow fsdp") runs only the steps named.
# PYTHON (default python3) is the image's interpreter; POCL_SITE (default /tmp/pocl-site) the install folder.
set -euo pipefail
out=${1:?usage: devtools/gpu_check.sh OUTDIR [WHEELHOUSE]}
wheels=${2:-.whl}
py=${PYTHON:-python3}
site=${POCL_SITE:-/tmp/pocl-site}
device=${POCL_CHECK_DEVICE:-cuda}
steps=" ${POCL_CHECK_STEPS:-scoring flow fsdp} "
mkdir -p "$out"
[ -d "$wheels" ] || { echo "no wheelhouse at $wheels: make one with devtools/offline_wheels.py" >&2; exit 2; }

start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }

step "installing $(ls "$wheels" | wc -l) files from $wheels into $site"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
for tarball in "$wheels"/*-slim.tar.xz; do
  [ -e "$tarball" ] && tar -xJf "$tarball" -C "$site"
done
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
export PREFECT_HOME=${PREFECT_HOME:-/tmp/pocl-prefect-home} PREFECT_UI_ENABLED=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

step "environment"
"$py" - <<'EOF' 2>&1 | tee "$out/environment.txt"
import platform, torch, transformers, ray, prefect
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| ray", ray.__version__, "| prefect", prefect.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

gpu_flag=() use_gpu=false dtype=float32
if [ "$device" = cuda ]; then gpu_flag=(--gpu) use_gpu=true dtype=bfloat16; fi

if [[ $steps == *" scoring "* ]]; then
  step "scoring benchmark ($device, $dtype): the CPU benchmark's model, then a larger one"
  tok=()  # SmolLM2's tokenizer (the benchmark's default vocabulary), packed by `make gpu-wheels`
  if [ -f "$wheels/tokenizer-smollm2.tar.xz" ]; then
    mkdir -p /tmp/pocl-tokenizer && tar -xJf "$wheels/tokenizer-smollm2.tar.xz" -C /tmp/pocl-tokenizer
    tok=(--tokenizer /tmp/pocl-tokenizer)
  fi
  "$py" -m benchmarks.bench_scoring "${gpu_flag[@]}" "${tok[@]}" --dtype "$dtype" --json | tee "$out/bench_scoring.json"
  if [ "$device" = cuda ]; then  # hours on one CPU thread
    "$py" -m benchmarks.bench_scoring --gpu "${tok[@]}" --dtype "$dtype" --json --samples 512 --layers 8 \
      --hidden 1024 --batch-size 32 | tee "$out/bench_scoring_large.json"
  fi
fi

runs=${POCL_RUNS_ROOT:-/tmp/pocl-gpu-runs}
autocast="$( [ "$dtype" = float32 ] && echo none || echo "$dtype")"
for strategy in ddp fsdp; do
  name=$( [ $strategy = ddp ] && echo flow || echo fsdp )
  [[ $steps == *" $name "* ]] || continue
  step "tiny models"
  "$py" -m flows.cli build-tiny --out .cache/tiny 2>&1 | tail -n 3
  step "tiny flow: ray.use_gpu=$use_gpu, 1 worker, $strategy, autocast $dtype, runs under $runs"
  run="tiny-$device-$strategy"
  "$py" -m flows.cli run --config configs/tiny.yaml --run-name "$run" runs_root="$runs" \
    ray.num_workers=1 ray.use_gpu=$use_gpu train.autocast_dtype="$autocast" train.parallel_strategy=$strategy \
    2>&1 | tee "$out/${run#tiny-$device-}_tiny_flow.log"
  cp "$runs/$run/report.md" "$out/${strategy}_tiny_report.md"
  cp "$runs/$run/train/metrics.jsonl" "$out/${strategy}_tiny_train_metrics.jsonl"
done
step "done: $(ls "$out" | tr '\n' ' ')"
