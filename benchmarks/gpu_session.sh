#!/usr/bin/env bash
# All GPU work of one session in one script (correctness, speed, CamVid training in 3,000 steps,
# evaluation), for a machine with one CUDA GPU. Results go to ${OUT:-runs/gpu}.
#   CAMVID_ROOT=path/to/camvid bash benchmarks/gpu_session.sh
# Needs the train and offline extras; nothing is downloaded (random or shipped weights only).
set -euo pipefail
out="${OUT:-runs/gpu}"
data="${CAMVID_ROOT:-../shared/data/camvid}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# 1. correctness: the model test suite on CPU is the reference; on GPU check bf16 logits agree.
python - <<'PY' | tee "$out/bf16_check.txt"
import torch
from lseg import LSeg
model = LSeg.from_config("vit_b16", pretrained=False).cuda().eval()
images = torch.randn(2, 3, 480, 640, device="cuda")
text = model.encode_text(["a", "b", "c"])
with torch.no_grad():
    full = model(images, text).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(images, text).logits.float()
agree = (full.argmax(1) == half.argmax(1)).float().mean().item()
print(f"bf16 vs fp32 argmax agreement: {agree:.4f}")
PY
# 2. speed (docs/performance.md): every mode against the original LSeg's execution re-implemented on
#    lseg's modules, in the same process (the original network itself is not run here).
#    Goals: vit_l16 batch 8 >= 400 images/s, batch 1 <= 10 ms, training (bf16, batch 4) >= 64 images/s.
python benchmarks/speed.py --device cuda --case vit_l16-480x480 --batch-size 8 \
    --repeats 20 --train --json "$out/speed_vitl16_b8.json"
python benchmarks/speed.py --device cuda --case vit_l16-480x480 --batch-size 1 \
    --repeats 50 --modes baseline fp16 bf16 bf16-compile --json "$out/speed_vitl16_b1.json"
python benchmarks/speed.py --device cuda --preset vit_b16 --repeats 20 --json "$out/speed_vitb16.json"
python benchmarks/speed.py --device cuda --preset vit_b16 --curves "$out/cost_curves_cuda.png"
# 3. CamVid from scratch (configs/camvid_gpu.yaml, 3,000 steps), then evaluation at full label resolution.
labels="[sky, building, pole, road, pavement, tree, sign symbol, fence, car, pedestrian, bicyclist]"
cat > "$out/camvid_data.yaml" <<YAML
data:
  train: [{name: camvid, root: $data, split: train, labels: $labels}]
  val: {name: camvid, root: $data, split: val, labels: $labels}
YAML
lseg train --config configs/camvid_gpu.yaml --config "$out/camvid_data.yaml" \
    --trainer.default_root_dir "$out/camvid_gpu" --trainer.enable_progress_bar false 2>&1 | tail -5
lseg evaluate --checkpoint "$out/camvid_gpu/model" --dataset camvid --data-root "$data" \
    --labels-file configs/labels/camvid.txt --out "$out/camvid_gpu_eval" | tail -25
