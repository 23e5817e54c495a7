#!/usr/bin/env bash
# On a lent GPU machine (one H100): the GPU tests, then the GPU benchmark, within ~8 minutes.
# Results go to $OUT (default ./gpu-check): tests.log, tests.xml, gpu_benchmark.{json,md,log}.
#
#   OUT=/tmp/out bash bench/gpu_check.sh
#
# The tests get 150 s, the benchmark the rest (its --budget-seconds stops starting sections in time).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LATENTRAY_CACHE="${LATENTRAY_CACHE:-$OUT/cache}"

{ nvidia-smi; python -c "import torch, diffusers, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'ray', ray.__version__)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. tests/gpu (CUDA paths: precision, memory cap, peaks, inductor compile, cuDNN attention, real out-of-memory errors)
timeout 150 python -m pytest tests/gpu -q -rs --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests/gpu exit $?"; tail -5 "$OUT/tests.log"

# 2. the benchmark, the whole job second (~2-3 minutes); a section starts only when it should end within
#    330 s, and the files are rewritten after each section, so a timeout still leaves what was measured
timeout 340 python bench/gpu_benchmark.py --sections flux,job,sdxl,vae,zimage,qwenimage --budget-seconds 330 --json "$OUT/gpu_benchmark.json" --markdown "$OUT/gpu_benchmark.md" \
    > "$OUT/gpu_benchmark.log" 2>&1
echo "gpu_benchmark exit $?"; cat "$OUT/gpu_benchmark.md" 2>/dev/null || tail -20 "$OUT/gpu_benchmark.log"
rm -rf "$LATENTRAY_CACHE"  # built presets: not worth bringing back
