#!/usr/bin/env bash
# GPU check: the CUDA tests, the main job on the GPU, and the speed tables with --device cuda.
# Run from the repository root on a CUDA machine that has torch; writes logs to $OUT (default: gpu_check_out/).
# Offline machines: put wheels of timm/datasets/dill/multiprocess in .whl/ first (see the script's first step).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
failed=0
step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || failed=1
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/summary.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"
step test_cuda 240 python3 -m pytest -p no:cacheprovider tests/test_cuda.py --durations 6
step main_job 200 bash -c "for r in backbone titans finetune; do python3 -m titans_timm.train -c train_timm_hparams/fashion_mnist_\$r.yaml --device cuda --no-progress --force || exit 1; done"
step memory_speed 90 python3 benchmarks/memory_speed.py --device cuda --warmup 5 --rounds 20
step memory_speed_amp_whole_image 60 python3 benchmarks/memory_speed.py --device cuda --warmup 5 --rounds 20 --amp --chunk-size none
step model_speed 200 python3 benchmarks/model_speed.py --device cuda --amp -b 64 --sizes tiny,small,base --warmup 3 --repeats 10 --csv "$OUT/model_speed.csv"
exit $failed
