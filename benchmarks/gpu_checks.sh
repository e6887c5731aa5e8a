#!/usr/bin/env bash
# The GPU checks as one command, for a lent CUDA machine whose Python already has torch, triton, typer,
# rich, onnx and onnxruntime (no network needed: brn runs from this tree through PYTHONPATH).
#   bash benchmarks/gpu_checks.sh [OUT_DIR]       (default gpu-checks/; about 5 minutes on one GPU)
# Writes machine.txt, the test logs and the benchmark tables (markdown + JSON) into OUT_DIR; paste the
# tables into docs/benchmarks.md with the machine line.
set -u -o pipefail
out=${1:-gpu-checks}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    $py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$out/machine.txt"
# The CUDA tests, eager path, then with the fused Triton kernel on (the layer tests run on CPU there too).
$py -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
BRN_FUSED_KERNEL=1 $py -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_gpu.py tests/test_triton_kernel.py tests/test_opcount.py 2>&1 | tee "$out/test_fused.log"
# Timings (CUDA events), eager and fused.
$py -m brn_cli bench --device cuda --what ops,layer,crossq,models --quick --force -o "$out/bench.json" \
    2>&1 | tee "$out/bench.md"
BRN_FUSED_KERNEL=1 $py -m brn_cli bench --device cuda --what ops,layer,crossq --quick --force \
    -o "$out/bench_fused.json" 2>&1 | tee "$out/bench_fused.md"
