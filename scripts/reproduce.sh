#!/usr/bin/env bash
# Regenerate the README's result tables on the shipped weights (seeds are in the recipes).
#   scripts/reproduce.sh [MAX_VIDEOS] [MAX_DETECT_VIDEOS]
set -euo pipefail
N="${1:-48}"
ND="${2:-12}"
SG="${SG:-streamguard}"
mkdir -p results
$SG evaluate synth-clip --max-videos "$N" --no-resume --output runs/evaluate/synth-clip --markdown results/synth-clip.md
# the same PatchZero cells with the detector after stage 1 only (before the adaptive stage 2)
$SG evaluate synth-clip --defenses patchzero --detector synth-patchzero-stage1 --max-videos "$N" --no-resume \
    --output runs/evaluate/stage1 --markdown results/stage1.md
$SG evaluate pipelines/ablation-temporal.toml --max-videos "$N" --no-resume --output runs/evaluate/ablation-temporal \
    --markdown results/ablation-temporal.md
$SG evaluate synth-detect --max-videos "$ND" --no-resume --output runs/evaluate/synth-detect --markdown results/synth-detect.md
# what the detector has never seen: recall per patch family at the model scale and at native size, benign FPR
python benchmarks/generalization.py --output benchmarks/results/generalization
# the stage-2 race of the shipped detector, as a picture (needs the run's detector-stage2.pt)
[ -f runs/train/synth-clip/detector-stage2.pt ] && python scripts/plot_race.py runs/train/synth-clip/detector-stage2.pt results/race.png
