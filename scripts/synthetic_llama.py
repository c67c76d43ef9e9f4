"""Write a random Llama-2-7B-shaped Hugging Face folder, one layer at a time, for memory benchmarks.

    python scripts/synthetic_llama.py OUT_DIR --layers 8
    onnxqf export OUT_DIR --kv-cache --dtype float16 -o OUT_DIR.genai/model.onnx

Shapes are Llama-2-7B's (hidden 4096, MLP 11008, 32 heads of 128, vocab 32000, untied lm_head);
weights are float16, normal with std 0.02 as Llama initializes them, with outlier channels as real
LLMs have them: ``--outliers`` residual channels carry 20x larger embedding values and 30x larger
norm scales (so every q/k/v and gate/up input has them), and as many MLP channels 10x larger
up_proj rows (so the down_proj input has them). The tensors are drawn and written one decoder layer
at a time into one safetensors shard per layer, so the script needs about one layer of memory
(~0.6 GB) whatever ``--layers`` is; a 32-layer folder is 13.5 GB on disk. The tokenizer is a
byte-level one (257 ids), which is all the model builder and the calibration need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
             vocab_size=32000)


def _normal(rng: np.random.Generator, *shape: int, std: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


def write_folder(out: Path, layers: int, outliers: int = 4, seed: int = 0, shape: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    shape = dict(shape or SHAPE)
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    rng = np.random.default_rng(seed)
    hot = rng.choice(d, size=outliers, replace=False)  # residual channels with outliers
    hot_mlp = rng.choice(f, size=outliers, replace=False)  # MLP channels with outliers
    out.mkdir(parents=True, exist_ok=True)
    shards = layers + 1
    index: dict[str, str] = {}

    def save(tensors: dict[str, np.ndarray], k: int) -> None:
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update({key: name for key in tensors})

    def norm() -> np.ndarray:
        g = np.ones(d, np.float16)
        g[hot] = 30.0
        return g

    emb = _normal(rng, v, d)
    emb[:, hot] *= 20
    save({"model.embed_tokens.weight": emb, "model.norm.weight": norm(), "lm_head.weight": _normal(rng, v, d)}, 0)
    del emb
    for i in range(layers):
        p = f"model.layers.{i}."
        up = _normal(rng, f, d)
        up[hot_mlp] *= 10
        tensors = {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                   p + "mlp.up_proj.weight": up, p + "mlp.gate_proj.weight": _normal(rng, f, d),
                   p + "mlp.down_proj.weight": _normal(rng, d, f)}
        kv = shape["num_key_value_heads"] * shape["head_dim"]  # grouped-query attention: fewer k/v heads
        heads = shape["num_attention_heads"] * shape["head_dim"]
        for name, rows, cols in (("q_proj", heads, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, heads)):
            tensors[p + f"self_attn.{name}.weight"] = _normal(rng, rows, cols)
        save(tensors, i + 1)
        del tensors, up
        print(f"layer {i + 1}/{layers} written", file=sys.stderr, flush=True)
    size = sum((out / n).stat().st_size for n in set(index.values()))
    index_doc = {"metadata": {"total_size": size}, "weight_map": index}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=1))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=layers, hidden_act="silu",
                  tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=10000.0,
                  bos_token_id=0, eos_token_id=0, torch_dtype="float16", dtype="float16", attention_bias=False,
                  mlp_bias=False, initializer_range=0.02, **shape)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_byte_tokenizer

    save_byte_tokenizer(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the folder to write (config.json, safetensors shards, tokenizer)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--outliers", type=int, default=4, help="outlier channels in the residual stream and in the MLP")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_folder(args.out, args.layers, args.outliers, args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
