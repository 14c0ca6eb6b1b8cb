#!/usr/bin/env bash
# The prepared GPU check for issue 6, one command on a machine with a CUDA GPU (about 6-8 min on
# an H200 after the venv exists): the step benchmark at ViT-B/16 224 px with --compile, the input
# pipeline at 2x128 images, and the tests that need CUDA. Results and logs go to $OUT (default
# ./bench-gpu): gpu.txt, step.json/.log, input.json/.log, tests.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench-gpu}"
mkdir -p "$OUT"
source scripts/venv.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
timeout 420 python benchmarks/step_throughput.py --compile --out "$OUT/step.json" 2>&1 | tee "$OUT/step.log"
timeout 120 python benchmarks/input_pipeline.py --batch-size 256 --batches 8 --out "$OUT/input.json" 2>&1 | tee "$OUT/input.log"
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_data_batch.py tests/test_model.py tests/test_trainer.py 2>&1 | tail -15 | tee "$OUT/tests.log"
