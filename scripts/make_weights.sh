#!/usr/bin/env bash
# Train the shipped default weights from scratch with our own commands (seeds in the recipe).
#   scripts/make_weights.sh [RECIPE] [DEVICE]        e.g. scripts/make_weights.sh synth-clip cuda
# Steps: SynthMotion -> tiny3d classifier -> real-footage backgrounds (scripts/get_footage.sh) -> DO attack
# cache + PatchZero stage 1 (DO, procedural patches, footage) -> stage 2 (the warm-started BPDA race)
# -> per-frame Faster R-CNN (recipe synth-detect) -> copy into weights/ with manifest entries
# (scripts/ship_weights.py).
# MODEL=synth-tiny3d skips the classifier and trains PatchZero against that one (the shipped detector was
# made so: MODEL=synth-tiny3d STAGE1_STEPS=... STAGE2_STEPS=... on a 2-core CPU; see weights/manifest.json).
set -euo pipefail
RECIPE="${1:-synth-clip}"
DEVICE="${2:-cpu}"
SG="${SG:-streamguard}"
RUN="${RUN:-runs/train/$RECIPE}"
STAGE2_STEPS="${STAGE2_STEPS:-3000}"
on_done() { [ -n "${OUT:-}" ] && cp -f "$RUN"/*.pt.json "$RUN"/classifier.pt "$RUN"/detector-stage*.pt "$OUT"/ 2>/dev/null || true; }
trap on_done EXIT
if [ -z "${MODEL:-}" ]; then
    $SG train classifier "$RECIPE" --device "$DEVICE" --output "$RUN" ${CLASSIFIER_STEPS:+--steps $CLASSIFIER_STEPS}
    MODEL="$RUN/classifier.pt"
fi
on_done
[ -f data/footage/footage.json ] || scripts/get_footage.sh
$SG train detector --stage 1 "$RECIPE" --device "$DEVICE" --output "$RUN" --model "$MODEL" ${STAGE1_STEPS:+--steps $STAGE1_STEPS}
on_done
$SG train detector --stage 2 "$RECIPE" --device "$DEVICE" --output "$RUN" --model "$MODEL" --steps "$STAGE2_STEPS"
on_done
DETECT_RUN="${DETECT_RUN:-runs/train/synth-detect}"
$SG train frame-detector synth-detect --device "$DEVICE" --output "$DETECT_RUN" ${FRAME_STEPS:+--steps $FRAME_STEPS}
python scripts/ship_weights.py "$RUN" "$DETECT_RUN"
