#!/usr/bin/env bash
# Fracture trainings on a lent GPU machine, all in one call (see README "Training on a GPU").
# Needs the compact data copy and the ImageNet shim in .gpu/ (bench/transfer_copy.py); runs the
# project's own `python -m boneai train` for each configuration, in parallel on the one GPU, each
# under a wall-clock budget, then packs the run folders (weights only where they fit) into $OUT.
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-6.8}          # minutes of training per run
EXTRA=${EXTRA:-}               # e.g. "--limit 60" for a smoke test
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/.gpu/pkgs:$PWD
mkdir -p "$OUT" runs
D=.gpu/fracatlas   # made by: python bench/transfer_copy.py ../shared/data/fracatlas .gpu/fracatlas --quality 87 --shim .gpu/pkgs
{ nvidia-smi -L; $PY -c "import torch, timm, cv2, PIL; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__, 'cv2', cv2.__version__, 'PIL', PIL.__version__)"; nproc; } > "$OUT/summary.txt" 2>&1
run() {
  local name=$1 workers=$2; shift 2
  $PY -m boneai train --task fracture --data $D --out runs/$name --workers $workers --max-minutes "$BUDGET" $EXTRA "$@" \
    > runs/$name.log 2>&1 &
}
E=${EPOCHS:-25}
run g_lite0_384 2 --model efficientnet_lite0 --image-size 384 --epochs $E --batch-size 32 --lr 1e-3
run g_lite0_448 3 --model efficientnet_lite0 --image-size 448 --epochs $E --batch-size 32 --lr 1e-3
run g_lite0_384c 2 --model efficientnet_lite0 --image-size 384 --epochs $E --batch-size 32 --lr 1e-3 --clahe
run g_lite0_320 2 --model efficientnet_lite0 --image-size 320 --epochs $E --batch-size 32 --lr 1e-3
run g_densenet169 2 --model densenet169 --image-size 224 --epochs $E --batch-size 32 --lr 1e-3
run g_resnet34 2 --model resnet34 --image-size 224 --epochs $E --batch-size 32 --lr 1e-3
wait
for d in runs/g_*/; do
  n=$(basename "$d")
  { echo "== $n"; tr '\r' '\n' < "runs/$n.log" | grep -v '^epoch .*it/s' | tail -n 6; } >> "$OUT/summary.txt"
  cp "runs/$n.log" "$d/train.log"
  rm -f "$d/checkpoint_last.pt" "$d/checkpoint_last.tmp" "$d/best_model.pt"
done
# Lite0 runs with weights (about 7 MB each), two per archive; the from-scratch baselines without.
tar czf "$OUT/lite_a.tgz" runs/g_lite0_384 runs/g_lite0_448
tar czf "$OUT/lite_b.tgz" runs/g_lite0_384c runs/g_lite0_320
tar czf "$OUT/baselines.tgz" --exclude=model.safetensors runs/g_densenet169 runs/g_resnet34
ls -la "$OUT" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
# A second, shorter call on the same warm machine trained two more candidates (both stopped by the
# 3.5-minute budget before their last epochs; see bench/results/fracture_candidates.json):
#   for c in "g_lite0_512 512 25" "g_lite0_448e35 448 35"; do set -- $c; python3 -m boneai train --task fracture \
#     --data .gpu/fracatlas --model efficientnet_lite0 --out runs/$1 --image-size $2 --epochs $3 --batch-size 32 \
#     --lr 1e-3 --workers 7 --max-minutes 3.5 > runs/$1.log 2>&1 & done; wait
