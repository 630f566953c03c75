#!/usr/bin/env bash
# The GPU check: every CUDA-only claim of this project measured in one command, <= 8 min on one H100 / H200.
#
#   experiments/benchmarks/gpu_check.sh                  # CUDA, real sizes (R50-FPN, 800x1333, batch 8)
#   experiments/benchmarks/gpu_check.sh --device cpu     # the same steps at tiny sizes on the CPU: a dry run
#   experiments/benchmarks/gpu_check.sh --tiny           # tiny sizes on CUDA (also GPU_CHECK_TINY=1)
#
# Steps: (a) pytest -m cuda; (b) the RPN loss at 1M-8M anchors (target < 1 ms per 1M anchors, fwd + bwd);
# (c) the training step focal / sampled, R50-FPN 800x1333 batch 8 (targets time <= 1.02x, peak memory <= 1.05x);
# (d) R50-FPN training images/s, fp32 / bf16 / bf16 + channels_last on a fixed batch and bf16 + channels_last fed
# by the real loader from COCO128, then bf16 + channels_last + torch.compile on its own time limit (target >= 40);
# (e) the CPU demo (fl-rpn-train with its defaults) on CUDA, its metrics beside the CPU run's of the README;
# host syncs in one step per RPN form (torch.cuda.set_sync_debug_mode). Then a summary table.
#
# Everything lands in one folder, 8 files at most: $OUT if set, else outputs/gpu_check.
# Environment: GPU_CHECK_COCO128 = the coco128/ folder (default data/coco128, git-ignored: copy it there);
# GPU_CHECK_DEMO_ITERS = iterations of the demo run (default: the demo's own 600, so that its schedule and
# metrics compare with the README's CPU run). A step that fails or runs out of time is reported and the others
# still run; the exit status is 1 if any step failed (or, but the compiled arm, had no time left).
# GPU_CHECK_BUDGET_S: the seconds all steps may take (465). PYTHON: the interpreter with the project's
# dependencies installed (default: python on PATH; the repository itself is put on PYTHONPATH).
set -uo pipefail
# paths given relative to the caller's directory stay so after the cd to the repository root
[ -n "${OUT:-}" ] && OUT=$(realpath -m "$OUT")
[ -n "${GPU_CHECK_COCO128:-}" ] && GPU_CHECK_COCO128=$(realpath -m "$GPU_CHECK_COCO128")
cd "$(dirname "$0")/../.."

DEVICE=cuda
TINY=${GPU_CHECK_TINY:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$DEVICE" = cpu ] && TINY=1

OUT_DIR=${OUT:-outputs/gpu_check}
COCO128=${GPU_CHECK_COCO128:-data/coco128}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/log.txt
: > "$LOG"
T0=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
B=experiments/benchmarks
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} FL_RPN_CACHE=$WORK/cache

# step NAME SECONDS COMMAND...: run it with a time limit (at most what is left of BUDGET), its output appended to
# log.txt, its status recorded
step() {
  local name=$1 limit=$2 start rc left
  shift 2
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, ${left} s left of the ${BUDGET} s budget" | tee -a "$LOG"
    echo "$name skipped 0" >> "$WORK/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit} s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
  echo "$name $rc $(( $(date +%s) - start ))" >> "$WORK/steps.txt"
}

# time limits per step (s), each cut to what is left of BUDGET, so that the whole stays <= 8 min; the compiled
# arm runs last, in whatever remains
declare -A LIMIT=([pytest]=100 [syncs]=45 [rpn_loss]=45 [train_step]=75 [throughput]=100 [demo]=120)
BUDGET=${GPU_CHECK_BUDGET_S:-465}
if [ "$TINY" = 1 ]; then
  for k in "${!LIMIT[@]}"; do LIMIT[$k]=600; done  # a slow, shared CPU
  BUDGET=${GPU_CHECK_BUDGET_S:-3600}
  RPN_ANCHORS=10000,20000; RPN_ARGS=(--images 2 --rounds 2 --min-sample-ms 1)
  STEP_ARGS=(--model tiny_fpn --size 128,160 --batch 2 --rounds 2 --warmup 1)
  TP_ARGS=(--model tiny_fpn --size 128,160 --batch 2 --steps 1 --rounds 1 --warmup 0 --workers 1 --loader-steps 2)
  SYNC_ARGS=(--model tiny_fpn --size 128,160 --batch 1)
  DEMO_ARGS=(dataset.train.num_images=8 dataset.val.num_images=4 "dataset.train.image_size=[96,128]"
             "dataset.val.image_size=[96,128]" model.detector.min_size=96 model.detector.max_size=128
             num_workers=1 schedule.max_iters=${GPU_CHECK_DEMO_ITERS:-4} schedule.warmup_iters=1 "schedule.steps=[]"
             schedule.log_every=2)
else
  RPN_ANCHORS=1000000,2000000,4000000,8000000; RPN_ARGS=(--images 8 --rounds 10)
  STEP_ARGS=(--model r50_fpn --size 800,1333 --batch 8 --rounds 10 --warmup 2 --same-state)
  TP_ARGS=(--model r50_fpn --size 800,1333 --batch 8 --steps 5 --rounds 3 --warmup 1 --workers 8 --loader-steps 15)
  SYNC_ARGS=(--model r50_fpn --size 800,1333 --batch 2)
  DEMO_ARGS=(${GPU_CHECK_DEMO_ITERS:+schedule.max_iters=$GPU_CHECK_DEMO_ITERS})
fi
{ echo "gpu_check.sh --device $DEVICE (tiny $TINY) at $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo '-dirty'), $(date -u +%FT%TZ)"
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee -a "$LOG"

# (a) the tests marked cuda (on the CPU: the same bodies with CPU stand-ins, FL_RPN_TEST_DEVICE=cpu)
step pytest "${LIMIT[pytest]}" env FL_RPN_TEST_DEVICE="$DEVICE" $PY -m pytest -q -m cuda tests/engine/test_cuda.py \
  -p no:cacheprovider --junitxml="$WORK/pytest.xml"
# host syncs in one training step per RPN form
step syncs "${LIMIT[syncs]}" $PY $B/sync_count.py --device "$DEVICE" "${SYNC_ARGS[@]}" --json "$OUT_DIR/syncs.json"
# (b) the RPN loss alone
step rpn_loss "${LIMIT[rpn_loss]}" $PY $B/rpn_loss.py --device "$DEVICE" --anchors "$RPN_ANCHORS" "${RPN_ARGS[@]}" \
  --no-write --json "$OUT_DIR/rpn_loss.json"
# (c) the training step, focal vs sampled, same weights and proposals in every arm
step train_step "${LIMIT[train_step]}" $PY $B/train_step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
  --arms sampled,focal_sigmoid,focal_softmax --no-write --json "$OUT_DIR/train_step.json"
# (d) images/s: fixed-batch arms and the loader-fed arm (COCO128)
step throughput "${LIMIT[throughput]}" $PY $B/gpu_throughput.py --device "$DEVICE" "${TP_ARGS[@]}" \
  --arms fp32,bf16,bf16+cl --data coco128 --data-root "$(dirname "$COCO128")" --no-write \
  --json "$OUT_DIR/throughput.json"
# (e) the CPU demo on CUDA (its defaults; the run directory stays outside $OUT_DIR, its metrics are copied)
step demo "${LIMIT[demo]}" $PY -m fl_rpn.cli.train device="$DEVICE" "${DEMO_ARGS[@]}" hydra.run.dir="$WORK/demo"
[ -f "$WORK/demo/metrics.json" ] && cp "$WORK/demo/metrics.json" "$OUT_DIR/demo_metrics.json"
# (d, last) the compiled arm, in whatever remains of the budget: compiling may take minutes
step throughput_compile "$BUDGET" $PY $B/gpu_throughput.py --device "$DEVICE" "${TP_ARGS[@]}" \
  --arms bf16+cl+compile --data none --no-write --json "$OUT_DIR/throughput_compile.json"

$PY $B/gpu_check_summary.py "$OUT_DIR" "$WORK/steps.txt" "$WORK/pytest.xml" --tiny "$TINY" | tee "$OUT_DIR/summary.md"
echo "gpu_check.sh: $(( $(date +%s) - T0 )) s in all; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
# exit 1 if a step failed or was skipped for time (the compiled arm, last, may be skipped)
! grep -qvE '^([a-z_]+ 0|throughput_compile skipped) [0-9]+$' "$WORK/steps.txt"
