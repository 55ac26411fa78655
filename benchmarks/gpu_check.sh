#!/usr/bin/env bash
# Every GPU-only check in one run (about 12 minutes on an H100/H200): the GPU tests (attention
# kernels, bf16 vs CPU fp32 curve, deterministic GPU resume, chunked cross-entropy memory), the
# throughput table of the 1.1B preset through `pretrain fit` (benchmarks/gpu_throughput.py: eager
# vs compile, plain vs auto-chunked cross-entropy decide the GPU recipes' defaults), and the
# start-up of the 120M recipe with compile, first launch vs relaunch on its compile cache
# (benchmarks/startup.py: Triton's cache included). docs/performance.md says what each decides.
#
#   python data/pystdlib/prepare.py          # once, on any machine: the benchmark's token data
#   bash benchmarks/gpu_check.sh RESULTS_DIR [configuration names for --only ...]
#
# Writes RESULTS_DIR/gpu_tests.log, throughput.log, throughput.json and startup.log. Needs the package's
# dependencies importable (an install, or PYTHONPATH=. with jsonargparse[signatures] present).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh RESULTS_DIR [CONFIG_NAME ...]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)" \
    | tee -a "$out/device.txt"
status=0
python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" || status=1
only=()
if [ $# -gt 0 ]; then only=(--only "$@"); fi
python benchmarks/gpu_throughput.py --config configs/tinyllama-1.1b.yaml --data data/pystdlib/out \
    --steps 10 --warmup 4 --json "$out/throughput.json" "${only[@]}" 2>&1 | tee "$out/throughput.log" || status=1
python benchmarks/startup.py --config configs/llama-120m.yaml --data data/pystdlib/out --rounds 1 --compile \
    2>&1 | tee "$out/startup.log" || status=1
exit $status
