#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool: a bare machine with PyTorch, ~15 minutes).
# Packs nothing itself: beforehand, on this machine,
#   python benchmarks/pack_data.py ../shared/data/busi .pack/busi --max-side 384
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl monai==1.6.1
# and carry .pack and .whl. Stages run on even when one fails; small results land in $OUT.
#   cv:    busi 5-fold group-aware CV, preset large, BUDGET minutes per fold, JOBS folds at once
#   speed: benchmarks/speed.py on CUDA (inference at 256/512 px, batch 1/8/16, the default auto backend
#          against the reference network, and training); needs seed_unet.py
#          in .pack/reference. SPEED_ARGS=--quick keeps only the 256 px batch-1 inference comparison
# STAGES picks and orders them (default "cv speed").
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/hemaseg-gpu-out}
DATA=${DATA:-.pack/busi}
PRESET=${PRESET:-large}
BUDGET=${BUDGET:-4}
JOBS=${JOBS:-5}
WORKERS=${WORKERS:-2}
RUNS=${RUNS:-/tmp/hemaseg-gpu-runs}
mkdir -p "$OUT" "$RUNS"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import os, torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'cpus', os.cpu_count())"
} 2>&1 | tee "$OUT/machine.txt"

speed() {
start=$(date +%s)
HEMASEG_REFERENCE_DIR=${HEMASEG_REFERENCE_DIR:-.pack/reference} \
$PY benchmarks/speed.py --device cuda ${SPEED_ARGS:-} --workers 4 --peak-gflops 67000 \
    --out "$OUT/speed_cuda.json" \
    2>&1 | tee "$OUT/speed_cuda.log"
echo "speed wall $(( $(date +%s) - start )) s" | tee -a "$OUT/speed_cuda.log"
}

cv() {
start=$(date +%s)
$PY -m hemaseg.cli cv "$DATA" --out "$RUNS/cv_$PRESET" --preset "$PRESET" --budget-minutes "$BUDGET" \
    --jobs "$JOBS" --num-workers "$WORKERS" 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$OUT/cv_$PRESET.log"
echo "cv wall $(( $(date +%s) - start )) s" | tee -a "$OUT/cv_$PRESET.log"
# the numbers only (the HTML report with its inline images can outgrow what comes back)
(cd "$RUNS" && tar czf "$OUT/cv_$PRESET.tgz" "cv_$PRESET"/*.json "cv_$PRESET"/oof/*.json "cv_$PRESET"/oof/per_image.csv "cv_$PRESET"/fold_*/*.json \
    "cv_$PRESET"/fold_*/metrics.csv)
}

for stage in ${STAGES:-cv speed}; do $stage; done
