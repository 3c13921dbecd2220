#!/usr/bin/env bash
# Evaluate a CamVid model on the val split with every protocol, and with unseen synonyms.
#   bash benchmarks/camvid_eval.sh [MODEL_DIR] [OUT_DIR]
# The CPU config trains at half resolution (long side 240), so `single` runs at 240, `slide` at the
# native 360 x 480 with 240-pixel windows, and `lseg-ms` uses 240 as its base size. Metrics are always
# computed at the original label resolution.
set -euo pipefail
model="${1:-runs/camvid/model}"
out="${2:-runs/camvid/eval}"
data="${CAMVID_ROOT:-../shared/data/camvid}"
common=(--checkpoint "$model" --dataset camvid --data-root "$data" --split val)
lseg evaluate "${common[@]}" --labels-file configs/labels/camvid.txt --protocol single --size 240 --out "$out/single"
lseg evaluate "${common[@]}" --labels-file configs/labels/camvid.txt --protocol slide --crop-size 240 --stride 160 --out "$out/slide"
lseg evaluate "${common[@]}" --labels-file configs/labels/camvid.txt --protocol lseg-ms --size 240 --out "$out/lseg-ms"
lseg evaluate "${common[@]}" --synonyms configs/labels/camvid_synonyms.txt --protocol single --size 240 --out "$out/synonyms"
