#!/usr/bin/env bash
# Reproduce docs/figures/inspect/ (see docs/inspect.md): `onnxqf inspect` on SmolLM2-135M-Instruct
# over 8 windows x 512 tokens of the WikiText-2 test split, all 30 layers. Paths are relative to
# the repository root; run from anywhere with onnxqf installed. About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# The model as exported by onnxqf (tokenizer saved beside it); exported first if it is missing.
[ -f out/smollm2.onnx ] || onnxqf export smollm2 -o out/smollm2.onnx

onnxqf inspect out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8 --seq 512 --out docs/figures/inspect

# For contrast, the heatmaps of an ordinary layer (5) too; the run above draws the layer with the
# largest down_proj input. Same windows and seed, so layer 5's scales and rotation are the same.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
onnxqf inspect out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8 --seq 512 \
    --layers 5 --heatmap-layer 5 --out "$tmp/layer5" --json > "$tmp/layer5.json"
cp "$tmp/layer5/heatmap_layer5_down_in.png" docs/figures/inspect/

# Keep what docs/inspect.md embeds, plus metrics.csv: drop the weight-difficulty and 4-bit plots,
# metrics.json and the o_proj / gate-up heatmaps (all in metrics.csv or reproducible), then store
# the PNGs with a 256-colour palette (a third of the size, no visible change).
cd docs/figures/inspect
rm -f weight_difficulty_*.png error4_*.png metrics.json heatmap_layer*_o_in.png heatmap_layer*_mlp_in.png
python - <<'PY'
import glob
from PIL import Image

for path in glob.glob("*.png"):
    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
PY
du -sh .
