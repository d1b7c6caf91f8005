#!/usr/bin/env bash
# Regenerate the README's result tables on the shipped weights (seeds are in the recipes).
#   scripts/reproduce.sh [MAX_VIDEOS]
set -euo pipefail
N="${1:-36}"
SG="${SG:-streamguard}"
mkdir -p results
$SG evaluate synth-clip --max-videos "$N" --no-resume --output runs/evaluate/synth-clip --markdown results/synth-clip.md
$SG evaluate pipelines/ablation-temporal.toml --max-videos "$N" --no-resume --output runs/evaluate/ablation-temporal \
    --markdown results/ablation-temporal.md
