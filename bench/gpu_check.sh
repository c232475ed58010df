#!/usr/bin/env bash
# The CUDA paths end to end on a GPU machine (train with AMP, SOSP-H / SOSP-I, prune, reopen), then the model
# conformance matrix with one CPU thread per model in parallel. Results go to $OUT (default: bench/results/gpu).
#   [MATRIX_ONLY='spec ...'] bash bench/gpu_check.sh [WORKERS] [MATRIX_SECONDS]
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
WORKERS=${1:-14}
MATRIX_SECONDS=${2:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
W=$(mktemp -d)
DEVICE=${DEVICE:-cuda}
run() { echo "+ $*"; local start=$SECONDS; "$@" || echo "  FAILED: exit $?"; echo "  ($((SECONDS - start)) s)"; }

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
run "$PY" -m sosp_engine train --model resnet20 --data digits --epochs 3 --device "$DEVICE" --save "$W/w.pt"
for method in sosp-h sosp-i; do
  run "$PY" -m sosp_engine analyze --model resnet20 --data digits --weights "$W/w.pt" --method "$method" \
      --samples 512 --device "$DEVICE" --ratio 0.5 --out "$W/$method" --workspace "$W/ws"
done
run "$PY" -m sosp_engine prune --model resnet20 --data digits --weights "$W/w.pt" --mask "$W/sosp-i/mask.json" \
    --save "$W/pruned.pt"
run "$PY" -m sosp_engine info --model resnet20 --data digits --weights "$W/pruned.pt" --out "$W/info.json"
run "$PY" -m sosp_engine sensitivity "$W/sosp-i" --points 5 --device "$DEVICE" --out "$OUT/sensitivity.csv"

[ "$MATRIX_SECONDS" -gt 0 ] || exit 0
grep -v '"status": "failed"' bench/results/model_matrix.jsonl > "$OUT/model_matrix.jsonl"
timeout "$MATRIX_SECONDS" "$PY" bench/model_matrix.py --workers "$WORKERS" --timeout 200 \
    --results "$OUT/model_matrix.jsonl" --doc "$OUT/models.md" ${MATRIX_ONLY:+--only $MATRIX_ONLY}
echo "matrix exit $?"
