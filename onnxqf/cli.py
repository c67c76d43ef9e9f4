"""The `onnxqf` command line: export, rewrite, eval, check, inspect."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from onnxqf.errors import OnnxqfError
from onnxqf.options import ACTIVATIONS, BLOCK_SIZES, FORMATS, RewriteOptions
from onnxqf.runtime.target import TARGETS

__all__ = ["DESCRIPTION", "build_parser", "main", "cmd_export", "rewrite_options", "cmd_rewrite", "cmd_eval",
           "cmd_generate", "cmd_check", "cmd_inspect", "cmd_bench"]

DESCRIPTION = """\
Make an LLM's activations quantization-friendly inside its ONNX graph, then quantize it to int8.

  onnxqf export smollm2 -o out/smollm2.onnx            # built-in SmolLM2-135M-Instruct
  onnxqf rewrite out/smollm2.onnx --hybrid              # smooth, rotate, W8A8 -> out/smollm2.hybrid.onnx
  onnxqf eval out/smollm2.onnx out/smollm2.hybrid.onnx --text wiki.test.raw
  onnxqf check out/smollm2.hybrid.onnx --ep cuda        # every node on the GPU?

exit codes: 0 ok, 1 a gate failed (eval --max-kl, check), 2 bad input or a graph onnxqf cannot handle,
3 execution provider unavailable, 130 interrupted, 143 terminated (temporary files are removed)
"""


def _alpha(text: str):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', not '{text}'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], not {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxqf", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"onnxqf {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser("export", help="export a Hugging Face causal LM to ONNX",
                       description="Export a causal LM (the built-in 'smollm2', a Hugging Face model directory, or a "
                                   ".gguf file) to ONNX: input_ids -> logits, dynamic batch and sequence, opset 18, "
                                   "weights as external data (OUT.data), the tokenizer saved beside it "
                                   "(OUT.tokenizer/). This plain logits-only graph is the default: the simplest graph, "
                                   "used for validation and CI. --kv-cache instead writes a complete onnxruntime-genai "
                                   "folder (KV cache, attention mask, genai_config.json, tokenizer) into OUT's folder "
                                   "with onnxruntime-genai's model builder, for apps that generate text.")
    e.add_argument("source", nargs="?", default="smollm2",
                   help="'smollm2' (default), a model directory or a .gguf file")
    e.add_argument("-o", "--output", required=True, help="output .onnx path")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="weight and compute dtype (default float32)")
    e.add_argument("--kv-cache", action="store_true",
                   help="write an onnxruntime-genai folder (DIR/model.onnx + genai_config.json + tokenizer) with the "
                        "model builder instead of the plain logits-only graph; needs pip install 'onnxqf[genai]'")
    e.add_argument("--ep", choices=["cpu", "cuda"],
                   help="with --kv-cache: the builder's target (default cpu for float32, cuda for float16; both run on "
                        "the CPU too)")

    r = sub.add_parser("rewrite", help="fold, smooth, rotate and quantize an exported model",
                       description="Rewrite an ONNX LLM. With no transform flag it only quantizes (W8A8). --smooth: "
                                   "SmoothQuant scales folded into norms/v_proj/up_proj. --rotate: randomized Hadamard "
                                   "rotation of the residual stream (folded), online Hadamard before down_proj, "
                                   "value/output head rotation. --hybrid: calibrated smoothing *before* rotation at "
                                   "all four linear inputs of every layer (scales folded into the norms, v_proj and "
                                   "up_proj; online Hadamards after the norms and before down_proj; α chosen per site "
                                   "by measured error after the exact rotation applied); --hybrid folded: the two-site "
                                   "variant with the residual rotation folded. The input file is never modified.")
    r.add_argument("model", nargs="?", help="input .onnx (e.g. from `onnxqf export`), or an onnxruntime-genai folder "
                                            "(DIR or DIR/model.onnx)")
    r.add_argument("-o", "--output", help="output .onnx (default: MODEL with .<preset>.onnx); for a genai folder a new "
                                          "folder, NEWDIR or NEWDIR/model.onnx (default: DIR.<preset>/), written with "
                                          "its config and tokenizer files")
    g = r.add_argument_group("transforms")
    g.add_argument("--rotate", nargs="?", const="full", choices=["full", "offline"], metavar="full|offline",
                   help="rotate with randomized Hadamard matrices. full (default): residual stream (folded), online "
                        "Hadamard before down_proj, value/output head rotation with online head mixing; offline: only "
                        "what folds into the weights (residual and per-head value rotations), no node added: for "
                        "weight-only formats that should run exactly as fast as unrotated ones")
    g.add_argument("--smooth", action="store_true", help="channel-wise scaling (SmoothQuant)")
    g.add_argument("--hybrid", nargs="?", const="full", choices=["full", "folded"], metavar="full|folded",
                   help="smoothing before rotation (the paper's hybrid; needs calibration text). full (default): at "
                        "all four linear inputs, with online Hadamards after the norms; folded: the two-site variant "
                        "(residual rotation folded, only the o_proj/down_proj inputs smoothed)")
    q = r.add_argument_group("quantization")
    q.add_argument("--quant", choices=FORMATS, default="int8",
                   help="int8: W8A8, int8 weights x int8 activations quantized per token at run time (default); int4 / "
                        "int8w: weight-only com.microsoft MatMulNBits (activations stay float; combine with --rotate, "
                        "not with --smooth/--hybrid, which would move difficulty into the weights); none: a float "
                        "model")
    q.add_argument("--ep", choices=sorted(TARGETS), default=None,
                   help="the execution provider the graph is lowered for (the model builder's -e): cpu lowers W8A8 to "
                        "uint8 x int8 MatMulInteger (ONNX Runtime's fast CPU kernels) and int4 to MatMulNBits with "
                        "accuracy_level 4; cuda to int8 x int8 MatMulInteger (every node on CUDA) and accuracy_level "
                        "0. Default: a genai folder's provider; for a plain graph cuda if its weights are float16, "
                        "else cpu")
    q.add_argument("--lowering", metavar="NAME",
                   help="a registered lowering instead of the target's choice, e.g. int8-token, uint8-token, "
                        "uint8-token-asym, int8-token-asym, uint8-tensor, onnxqf-cpu, onnxqf-cuda (`onnxqf rewrite "
                        "--list-lowerings`), optionally with fields of its config: onnxqf-cpu:fuse_rotations=false, "
                        "onnxqf-cpu:gemm=onnxqf (onnxqf's own int8 GEMM: CPUs with AVX-512 VNNI / AMX)")
    q.add_argument("--list-lowerings", action="store_true", help="list the registered lowerings and exit")
    q.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=32,
                   help="weights per scale along the input dimension for int4/int8w (default 32)")
    q.add_argument("--asymmetric", action="store_true",
                   help="int4/int8w: a zero point per block (MatMulNBits' zero_points input) instead of symmetric "
                        "codes; on SmolLM2 with --rotate and GPTQ, int4 block 32 KL 0.091 against 0.101 symmetric")
    q.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="int4/int8w: MatMulNBits' accuracy_level (default: 4 for --ep cpu, int8 compute inside the op "
                        "as the model builder's CPU default; 0 for cuda)")
    q.add_argument("--lm-head-bits", type=int, choices=[4, 8],
                   help="with --quantize-lm-head: bits of lm_head's weights (int4/int8w: default 8); with W8A8, "
                        "lm_head becomes weight-only MatMulNBits of these bits (block 32) instead of W8A8")
    q.add_argument("--act-quant", choices=ACTIVATIONS, default=None,
                   help="W8A8 activations: token: symmetric per token (the default, but asym with --lowering "
                        "onnxqf-cpu, where it costs nothing: docs/results.md 2b); asym: a scale and a zero point per "
                        "token (the zero point applied after the GEMM with the weights' column sums); iter: asym with "
                        "each token's scale and zero point refined by 5 rounds of least squares; tensor: "
                        "DynamicQuantizeLinear, per tensor (CPU only)")
    q.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize lm_head (kept float by default); with --hybrid its input is rotated online too "
                        "(SmolLM2, W8A8 lm_head: KL 0.0026 against 0.0017 with a float one; docs/results.md 2c)")
    q.add_argument("--weight-rounding", choices=["gptq", "rtn"], default="gptq",
                   help="gptq: error-compensating rounding with the calibration inputs' X^T X (default); rtn: round to "
                        "nearest")
    q.add_argument("--gptq-inputs", choices=["float", "sequential"], default="float",
                   help="where GPTQ's X^T X come from. float (default): one run of the float model for all layers; "
                        "sequential: the model is run one layer at a time and each layer's inputs are the outputs of "
                        "the layers before it with their weights already rounded (GPTQ's and QuaRot's order; the model "
                        "runs twice). On SmolLM2 sequential measured no better (docs/results.md)")
    q.add_argument("--clip-search", action="store_true", help="search a clipping ratio per weight scale: per output "
                                                              "channel for int8, per block and column for int4/int8w "
                                                              "(weighted by the calibration inputs; with --asymmetric "
                                                              "the most accurate int4 measured on SmolLM2, "
                                                              "docs/results.md §6)")
    q.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="bounded memory for models larger than RAM: calibration and GPTQ run one layer at a time and "
                        "every rewritten weight goes to a scratch folder beside the output at once (Llama-2-7B-shaped "
                        "models of 8 and 32 layers: 2.0-2.1 GB peak, docs/benchmarks.md). Default: on when the weights "
                        "exceed 2 GiB")
    q.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                   help="leave matching linears in float, e.g. down_proj or 'layers.29.*' (repeatable)")
    c = r.add_argument_group("calibration (for --smooth / --hybrid and GPTQ weight rounding)")
    c.add_argument("--calib", default="builtin", help="calibration text file or .npy of token ids (default: a built-in "
                                                      "English text)")
    c.add_argument("--calib-windows", type=_positive, default=8, help="number of windows (default 8)")
    c.add_argument("--calib-seq", type=_positive, default=512, help="tokens per window (default 512)")
    c.add_argument("--alpha", type=_alpha, default="auto", help="smoothing strength in [0, 1], or 'auto': per layer, "
                                                                "by measured quantization error (default)")
    c.add_argument("--tokenizer", help="tokenizer folder (default: the one saved beside the model by `onnxqf export`)")
    g.add_argument("--online-rotation", metavar="cycle|batched[:N]",
                   help="how online rotations become nodes (default: the target's, measured fastest on it): cycle: a "
                        "GEMM on the last axis and a Transpose per Kronecker factor; batched: factors as broadcast "
                        "left-multiplications, no Transpose; :N the largest merged factor (default 512)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random signs and rotations")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    v = sub.add_parser("eval", help="KL divergence, perplexity and top-1 agreement of NEW against ORIG",
                       description="Run both models on the same windows of text and report KL(P_orig || P_new) in "
                                   "nats/token over all positions, the perplexity of both, and top-1 agreement.")
    v.add_argument("orig")
    v.add_argument("new")
    _text_args(v, windows=16, tokenizer_of="ORIG")
    v.add_argument("--ep", choices=["cpu", "cuda"], default="cpu", help="execution provider (default cpu)")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    v.add_argument("--max-kl", type=float, help="exit 1 if KL exceeds this (CI gate)")

    k = sub.add_parser("check", help="check node placement on an execution provider (CI gate)",
                       description="Create an ONNX Runtime session with CPU fallback disabled and report where every "
                                   "node runs. Static rules are checked too, without running anything: nodes the "
                                   "provider has no kernel for or runs on a slow path (int8 x int8 MatMulInteger on "
                                   "the CPU), and a graph lowered for another target (`rewrite --ep`). Exit 0: every "
                                   "node on the provider, no Memcpy, no static issue; 1: some nodes would fall back, "
                                   "copies are inserted, or a static rule fails; 2: bad input; 3: the provider is not "
                                   "available here (skipped). A genai folder is checked through its decoder graph; "
                                   "with --baseline, only nodes the rewrite added count.")
    k.add_argument("model", help=".onnx file or onnxruntime-genai folder")
    k.add_argument("--baseline", help="the graph MODEL was rewritten from: exit 0 if MODEL puts no more nodes off the "
                                      "provider than it (e.g. onnxruntime-genai graphs keep GroupQueryAttention's "
                                      "sequence length on the CPU)")
    k.add_argument("--ep", choices=sorted(TARGETS), default="cuda", help="execution provider (default cuda)")
    k.add_argument("--json", action="store_true")

    n = sub.add_parser("inspect", help="quantization difficulty per layer: original / smooth / rotate / smooth+rotate",
                       description="Capture the inputs of every linear (q/k/v, o_proj, gate/up, down_proj) on windows "
                                   "of text, with the norm scales folded into the weights, and measure per layer how "
                                   "hard they are to quantize as they are, smoothed (X/s, diag(s)B), rotated (XQ, Q^T "
                                   "B) and smoothed then rotated: difficulty (std of channel L2 norms) of activations "
                                   "and weights, max|x|, and the layer error ||XB - Q(X')Q(B')||^2 at 8 and 4 bits. "
                                   "Writes metrics.csv, metrics.json and PNG plots to --out; no model is written.")
    n.add_argument("model", help="an .onnx LLM (e.g. from `onnxqf export`)")
    _text_args(n, windows=8, tokenizer_of="the model")
    n.add_argument("--layers", help="layers to inspect, e.g. '0,5,10-12' (default: all)")
    n.add_argument("--alpha", type=_alpha, default=0.5, help="smoothing strength in [0, 1] (default 0.5)")
    n.add_argument("--out", help="output folder (default: MODEL without .onnx, plus -inspect); replaced only when done")
    n.add_argument("--heatmap-layer", type=int, metavar="K",
                   help="layer of the token x channel heatmaps (default: the layer with the largest down_proj input)")
    n.add_argument("--seed", type=int, default=0, help="seed of the rotations (those `rewrite --hybrid --seed` draws; "
                                                       "default 0)")
    n.add_argument("--json", action="store_true", help="print one JSON object with the summary instead of a table")
    gen = sub.add_parser("generate", help="generate text from an onnxruntime-genai folder (greedy, streamed)",
                         description="A thin wrapper over onnxruntime-genai: load DIR (written by `onnxqf export "
                                     "--kv-cache`), stream greedy tokens of the continuation of --prompt to stdout, "
                                     "and print prefill and decode tokens/s to stderr at the end.")
    gen.add_argument("model", metavar="DIR", help="an onnxruntime-genai folder (or DIR/model.onnx)")
    gen.add_argument("--prompt", required=True, help="the text to continue (fed as it is: no chat template)")
    gen.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--ep", choices=["cpu", "cuda"], default="cpu", help="execution provider (default cpu)")
    gen.add_argument("--cuda-graph", action="store_true",
                     help="with --ep cuda: onnxruntime-genai replays each decode step as a CUDA graph (the CUDA "
                          "provider's enable_cuda_graph)")
    pl = sub.add_parser("pipeline", help="join two rewrites of one genai model: one graph for prompts, one for tokens",
                        description="Write one onnxruntime-genai folder that runs PREFILL's graph on the prompt and "
                                    "DECODE's on every generated token (genai's decoder-pipeline stages; both graphs "
                                    "share the KV cache, so both must be rewrites with the same transform and seed: "
                                    "checked by comparing their caches on a short prompt; --hybrid has no weight-only "
                                    "partner). On the CPU: a W8A8 rewrite for prompts (MatMulIntegerToFloat) and "
                                    "--quant int8w for decoding (MatMulNBits' int8 kernels, faster at one token on "
                                    "some CPUs: docs/benchmarks.md h). Two copies of the weights.",
                        epilog="example: onnxqf rewrite gen --rotate --lowering onnxqf-cpu -o gen.w8a8 && onnxqf "
                               "rewrite gen --rotate --quant int8w -o gen.int8w && onnxqf pipeline gen.w8a8 gen.int8w "
                               "-o gen.pipeline && onnxqf generate gen.pipeline --prompt 'Hello'")
    pl.add_argument("prefill", metavar="PREFILL", help="genai folder whose graph runs on prompts")
    pl.add_argument("decode", metavar="DECODE", help="genai folder whose graph runs on each generated token")
    pl.add_argument("-o", "--output", required=True, help="the new folder (NEWDIR or NEWDIR/model.onnx)")
    b = sub.add_parser("bench", help="prefill and KV-cache decode speed against a reference (IOBinding)",
                       description="Time each MODEL and a reference in the same run: prefill (one forward of batch x "
                                   "seq) and, for KV-cache graphs (onnxruntime-genai layout), a decode loop of "
                                   "--decode-tokens steps from random pasts of each --past length, the cache bound as "
                                   "onnxruntime-genai binds it (--cache). Inputs and outputs stay on the device "
                                   "(IOBinding). "
                                   "Median [min-max] of --repeats runs after --warmup, and the speed against the "
                                   "reference (the first MODEL unless --ref). Exit 2: bad input (e.g. no logits "
                                   "output); 3: the provider is not available here.")
    b.add_argument("models", nargs="*", metavar="MODEL", help=".onnx files (plain input_ids -> logits, or with a KV "
                                                              "cache)")
    b.add_argument("--ref", help="reference model (default: the first MODEL)")
    b.add_argument("--ep", choices=["cpu", "cuda"], default="cpu", help="execution provider (default cpu)")
    b.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    b.add_argument("--seq", type=_positive, default=512, help="prefill tokens per sequence (default 512)")
    b.add_argument("--past", default="128,512,2048", help="decode past lengths, comma-separated (default 128,512,2048)")
    b.add_argument("--decode-tokens", type=int, default=32, help="decode steps per timed run, 0 for no decode (default "
                                                                 "32)")
    b.add_argument("--repeats", type=_positive, default=10, help="timed runs per measurement (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs before them (default 3)")
    b.add_argument("--cache", choices=["auto", "shared", "separate"], default="auto",
                   help="how the KV cache is bound: auto (default) as the folder's genai_config.json says (its "
                        "search.past_present_share_buffer: onnxruntime-genai then binds one buffer as both past and "
                        "present, which GroupQueryAttention writes in place; the model builder sets it for every "
                        "GroupQueryAttention folder), shared (one buffer; GroupQueryAttention graphs only) or separate "
                        "(each step's present is a new output, fed back as the next past)")
    b.add_argument("--cuda-graph", action="store_true",
                   help="with --ep cuda, also time each decode step at a fixed past replayed as a CUDA graph (ONNX "
                        "Runtime's enable_cuda_graph): the step's GPU time without per-kernel launch cost; needs every "
                        "node on CUDA")
    b.add_argument("--nbits-kernel", choices=["default", "fpa-intb", "both"], default="default",
                   help="MatMulNBits kernels on CUDA: default (ONNX Runtime's own), fpa-intb (its CUTLASS weight-only "
                        "kernels from TensorRT-LLM, what ORT_FPA_INTB_GEMM=1 selects; only symmetric block-32 float16 "
                        "nodes, see `onnxqf check`) or both (each such model twice). On an H200 they made int4 decode "
                        "1.3x faster than the default kernels at --batch 16, no faster at batch 1, and prefill 1.6x "
                        "slower (docs/benchmarks.md, section f)")
    b.add_argument("--op-times", action="store_true",
                   help="also profile each model (a second session) and print where the time goes, per prefill "
                        "and per decode token: on the CPU ONNX Runtime's profiler, kernel time per operator type (it "
                        "adds a few microseconds per node: compare the shares); on CUDA the GPU's activity tracer "
                        "through PyTorch's profiler, GPU time per kernel. With --linears (CUDA): GPU time per kernel "
                        "per linear")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    lin = b.add_argument_group("one linear at a time (no MODEL): graphs of --copies linears x @ W, lowered by "
                               "registered lowerings (`rewrite --list-lowerings`), timed against float "
                               "(onnxqf/runtime/linears.py)")
    lin.add_argument("--linears", metavar="K:N[,K:N...]", help="weight shapes to time instead of MODELs")
    lin.add_argument("--m", default="1,16,256", help="rows of x (tokens) per run, comma-separated (default 1,16,256)")
    lin.add_argument("--lowerings", default="uint8-token,int8-token,matmulnbits",
                     help="comma-separated NAME[:FIELD=VALUE...] (e.g. matmulnbits:bits=8:block_size=128); float is "
                          "always timed first (default uint8-token,int8-token,matmulnbits)")
    lin.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="activations (default float32)")
    lin.add_argument("--copies", type=_positive, default=8, help="independent linears per graph (default 8)")
    lin.add_argument("--rotated", action="store_true",
                     help="each lowered linear reads its own online Hadamard rotation of x (what --hybrid puts before "
                          "a down_proj), in the provider's style; onnxqf-cuda runs it inside its op; float stays a "
                          "plain MatMul (the time to beat)")
    return p


def _text_args(p: argparse.ArgumentParser, windows: int, tokenizer_of: str) -> None:
    """--text | --tokens, --windows, --seq, --tokenizer: the token windows a command runs on."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file, tokenized with the model's tokenizer")
    src.add_argument("--tokens", help="a .npy file of token ids")
    p.add_argument("--windows", type=_positive, default=windows, help=f"number of windows (default {windows})")
    p.add_argument("--seq", type=_positive, default=512, help="tokens per window (default 512)")
    p.add_argument("--tokenizer", help=f"tokenizer folder (default: the one beside {tokenizer_of})")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxqf")
    except Exception:
        return "unknown"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when the handler was made (a caller
    or a test that replaces it between two runs of :func:`main` gets the messages of the second)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("onnxqf")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[onnxqf] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False) or getattr(args, "json", False))
    previous = _terminate_cleanly()
    try:
        return {"export": cmd_export, "rewrite": cmd_rewrite, "eval": cmd_eval, "check": cmd_check,
                "inspect": cmd_inspect, "generate": cmd_generate, "bench": cmd_bench,
                "pipeline": cmd_pipeline}[args.command](args)
    except OnnxqfError as exc:
        print(f"onnxqf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxqf: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("onnxqf: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:  # main() may be called in-process (tests): leave the handler as it was
            import signal

            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    pass


def _terminate_cleanly():
    """SIGTERM (``kill``, a CI timeout) unwinds like Ctrl-C, so temporary folders are removed on the way out
    (SIGKILL cannot be caught: the next save into the same folder removes what such a run left)."""
    import signal
    import threading

    def handler(signum, frame):
        raise _Terminated()

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)  # the previous handler
    return None


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def cmd_export(args) -> int:
    from onnxqf.models.export import export

    out = Path(args.output)
    if out.suffix != ".onnx":
        raise OnnxqfError(f"{out}: the output name must end in .onnx")
    if args.kv_cache:
        from onnxqf.models.genai_export import export_genai

        print(export_genai(args.source, out, dtype=args.dtype, ep=args.ep))
        return 0
    if args.ep:
        raise OnnxqfError("--ep is the model builder's target: it goes with --kv-cache")
    export(args.source, out, dtype=args.dtype)
    print(out)
    return 0


def _transform(args) -> str:
    if args.hybrid and (args.rotate or args.smooth):
        raise OnnxqfError("--hybrid already smooths and rotates; do not combine it with --rotate/--smooth")
    if args.hybrid:
        return "hybrid" if args.hybrid == "full" else "hybrid-folded"
    if args.rotate and not args.smooth:
        return "rotate" if args.rotate == "full" else "rotate-offline"
    transforms = {(False, False): "none", (False, True): "smooth", (True, True): "smooth+rotate"}
    return transforms[(bool(args.rotate), args.smooth)]


def _default_output(model: Path, args) -> Path:
    t = _transform(args)
    tag = {"none": "", "smooth+rotate": "smooth-rotate"}.get(t, t)
    quant = {"int8": "w8a8" if not tag else "", "none": "float"}.get(args.quant, args.quant)
    if args.quant in ("int4", "int8w") and args.block_size != 32:
        quant += f"-b{args.block_size}"
    if args.quant == "int8" and args.act_quant not in (None, "token"):
        quant += f".{args.act_quant}" if quant else args.act_quant
    return model.with_name(".".join(x for x in (model.stem, tag, quant, "onnx") if x))


def _default_genai_output(folder, args) -> Path:
    """A genai folder's rewrite goes to a sibling folder: gen/model.onnx -> gen.rotate.float/model.onnx."""
    d = folder.directory
    return d.with_name(_default_output(Path(d.name + ".onnx"), args).stem) / folder.model_path.name


def rewrite_options(args) -> RewriteOptions:
    """The typed options of a `rewrite` command line (each config validates itself)."""
    from onnxqf.options import Calibration, Transform, quant_config

    transform = _transform(args)
    if transform == "smooth+rotate":
        raise OnnxqfError("--smooth --rotate: use --hybrid (smoothing before rotation)")
    if args.quant == "int8" and args.asymmetric:
        raise OnnxqfError("--asymmetric applies to the weight-only formats (--quant int4 or int8w); for asymmetric "
                          "W8A8 activations use --act-quant asym")
    quant = quant_config(args.quant, activations=args.act_quant, clip_search=args.clip_search, lowering=args.lowering,
                         block_size=args.block_size, asymmetric=args.asymmetric, accuracy_level=args.accuracy_level,
                         lm_head_bits=args.lm_head_bits)
    if args.lowering and args.quant != "int8":
        raise OnnxqfError("--lowering picks a W8A8 lowering (--quant int8); weight-only formats are MatMulNBits")
    return RewriteOptions(
        transform=Transform(transform, alpha=args.alpha, seed=args.seed), quant=quant,
        calibration=Calibration(args.calib, args.calib_windows, args.calib_seq, rounding=args.weight_rounding,
                                sequential=args.gptq_inputs == "sequential"),
        target=args.ep, quantize_lm_head=args.quantize_lm_head, keep_float=tuple(args.keep_float),
        progress=not args.quiet, low_memory=args.low_memory, online_rotation=args.online_rotation)


def cmd_rewrite(args) -> int:
    from onnxqf.calib.data import load_tokenizer
    from onnxqf.genai.folder import genai_dir, output_path, read_genai, write_folder
    from onnxqf.graph.modelfile import load_model
    from onnxqf.pipeline import rewrite
    from onnxqf.runtime.kernels import libraries_for
    from onnxqf.runtime.target import genai_provider

    if args.list_lowerings:
        from onnxqf.lowering.base import REGISTRY, names

        for name in names():
            cls = REGISTRY[name]
            print(f"{name:18s} {cls.format:6s} {'/'.join(cls.providers):9s} {cls.summary}")
        return 0
    if args.model is None:
        raise OnnxqfError("rewrite needs a MODEL (an .onnx file or an onnxruntime-genai folder)")
    opts = rewrite_options(args)
    src = Path(args.model)
    _refuse_pipeline(src, "rewrite the two folders it joins, then join them again")
    folder = read_genai(src) if genai_dir(src) is not None else None  # an onnxruntime-genai folder (or its graph)
    if folder is not None:
        out = output_path(folder, args.output or _default_genai_output(folder, args))
        src = folder.model_path
    else:
        out = Path(args.output) if args.output else _default_output(src, args)
        if out.suffix != ".onnx":
            raise OnnxqfError(f"{out}: the output name must end in .onnx")
        if out.exists() and src.exists() and _same_file(src, out):
            raise OnnxqfError("the output would overwrite the input; choose another -o")
    if folder is not None and opts.quant is not None and opts.quant.format == "int8" and opts.quant.lowering:
        from onnxqf.lowering.base import parse_spec

        libraries_for(set(parse_spec(opts.quant.lowering)[0].domains))  # a missing library: now, not after
    model = load_model(src)
    tok_dir = args.tokenizer or (str(folder.directory) if folder is not None else None)  # genai folders hold theirs
    needs_tokenizer = opts.needs_calibration and not args.calib.endswith(".npy")
    tokenizer = load_tokenizer(src, model, tok_dir) if needs_tokenizer else None

    def save(model) -> None:
        if folder is not None:  # the whole folder: decoder, genai_config.json, tokenizer files (+ the kernels it needs)
            libraries = libraries_for(set(model.graph.opset_imports))  # [] for most graphs
            write_folder(folder, model, out, libraries[0] if libraries else None)
        else:
            _save_plain(model, src, out)

    report = rewrite(model, opts, tokenizer, genai_provider=None if folder is None else genai_provider(folder.decoder),
                     scratch=out.parent.parent if folder is not None else out.parent, save=save)
    if not args.quiet:
        lowered = f", {report.lowering} for --ep {report.target}" if report.lowering else ""
        print(f"[onnxqf] {opts.label}: {len(report.quantized)} MatMuls quantized{lowered}, {report.seconds} s",
              file=sys.stderr)
    print(out)
    return 0


def _save_plain(model, src: Path, out: Path) -> None:
    from onnxqf.graph.modelfile import get_metadata, save_model, set_metadata
    from onnxqf.models.export import TOKENIZER_SUFFIX, copy_tokenizer_dir

    tok_rel = get_metadata(model, "tokenizer")
    tok_src = src.parent / tok_rel if tok_rel else None
    if tok_src is not None and tok_src.is_dir():
        tok_dst = out.parent / (out.name + TOKENIZER_SUFFIX)
        if not (tok_dst.exists() and _same_file(tok_src, tok_dst)):
            copy_tokenizer_dir(tok_src, tok_dst)
        set_metadata(model, "tokenizer", tok_dst.name)
    save_model(model, out)


def cmd_eval(args) -> int:
    from onnxqf.analysis.evaluate import compare, format_table, to_json
    from onnxqf.calib.data import token_windows
    from onnxqf.genai.folder import genai_dir, model_file, read_genai
    from onnxqf.graph.modelfile import load_model

    orig_file, new_file = model_file(args.orig), model_file(args.new)  # a genai folder means its decoder graph
    orig = load_model(orig_file)  # validates the file before ONNX Runtime sees it
    load_model(new_file)
    tokenizer, vocab = args.tokenizer, _vocab(orig)
    if genai_dir(orig_file) is not None:  # a genai folder holds its tokenizer files and vocab size
        tokenizer = tokenizer or str(genai_dir(orig_file))
        vocab = vocab or read_genai(orig_file, check_attention=False).vocab
    wins = token_windows(args.text or args.tokens, orig_file, orig, args.windows, args.seq,
                         tokenizer=tokenizer, vocab=vocab)
    del orig
    result = compare(orig_file, new_file, wins, ep=args.ep, progress=not args.json, max_abs=True)
    print(to_json(result) if args.json else format_table(result, args.orig, args.new))
    if args.max_kl is not None and not result["kl"] <= args.max_kl:
        print(f"onnxqf: KL {result['kl']:.6f} exceeds --max-kl {args.max_kl}", file=sys.stderr)
        return 1
    return 0


def _vocab(model) -> int | None:
    try:
        from onnxqf.recognize import recognize

        return recognize(model).config.vocab
    except OnnxqfError:
        return None


def cmd_generate(args) -> int:
    from onnxqf.genai.generate import generate

    generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, ep=args.ep, cuda_graph=args.cuda_graph)
    return 0


def cmd_check(args) -> int:
    from onnxqf.genai.folder import model_file
    from onnxqf.graph.modelfile import load_model
    from onnxqf.runtime.placement import check_placement, format_placement, with_static_issues
    from onnxqf.runtime.target import get_target

    path = model_file(args.model)  # a genai folder: its decoder graph
    model = load_model(path)
    result = check_placement(path, args.ep)
    if args.baseline:
        from onnxqf.runtime.placement import compare_to_baseline

        result = compare_to_baseline(result, check_placement(model_file(args.baseline), args.ep))
    result = with_static_issues(result, get_target(args.ep).node_issues(model))  # known without running: CI too
    if args.ep == "cuda":
        import onnx

        from onnxqf.runtime.placement import format_nbits_kernels, nbits_kernels

        result["matmulnbits"] = nbits_kernels(onnx.load(str(path), load_external_data=False))
        note = format_nbits_kernels(result["matmulnbits"])
    else:
        note = None
    print(json.dumps(result) if args.json else format_placement(result) + (f"\n{note}" if note else ""))
    if result["status"] == "unavailable":
        return 3
    return 0 if result["status"] == "ok" else 1


def cmd_inspect(args) -> int:
    from onnxqf.analysis.inspection import InspectOptions, print_report, run_inspect

    opts = InspectOptions(windows=args.windows, seq=args.seq, layers=args.layers, alpha=args.alpha,
                          heatmap_layer=args.heatmap_layer, seed=args.seed, progress=not args.json)
    result = run_inspect(args.model, args.text or args.tokens, args.out, opts, tokenizer_dir=args.tokenizer)
    print_report(result, args.json)
    return 0


def cmd_pipeline(args) -> int:
    from onnxqf.genai.pipeline import join

    print(join(args.prefill, args.decode, args.output))
    return 0


def _refuse_pipeline(path, what: str) -> None:
    """A prefill / decode pipeline folder is read as its prompt graph; ``what`` cannot work on that alone."""
    from onnxqf.genai.folder import genai_dir, is_pipeline

    if is_pipeline(path):
        raise OnnxqfError(f"{genai_dir(path)}: a prefill / decode pipeline folder (`onnxqf pipeline`); {what}")


def cmd_bench(args) -> int:
    from onnxqf.runtime.bench import BenchOptions, format_table, parse_past, run_bench

    if args.linears:
        return _bench_linears(args)
    if not args.models:
        raise OnnxqfError("bench needs MODEL files, or --linears K:N")
    for m in [*args.models, *([args.ref] if args.ref else [])]:
        _refuse_pipeline(m, "bench times one graph: time the two folders it joins, or run `onnxqf generate` on it")
    opts = BenchOptions(ep=args.ep, batch=args.batch, seq=args.seq, past=parse_past(args.past),
                        decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
                        cuda_graph=args.cuda_graph, progress=not (args.quiet or args.json),
                        nbits_kernel=args.nbits_kernel, op_times=args.op_times, cache=args.cache)
    result = run_bench(args.models, opts, ref=args.ref)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _bench_linears(args) -> int:
    from onnxqf.runtime.linears import LinearsOptions, bench_linears, format_linears, parse_counts, parse_shapes

    if args.models:
        raise OnnxqfError("--linears times its own graphs: give no MODEL")
    opts = LinearsOptions(shapes=parse_shapes(args.linears), ms=parse_counts(args.m), ep=args.ep, dtype=args.dtype,
                          lowerings=tuple(s for s in args.lowerings.split(",") if s), copies=args.copies,
                          repeats=args.repeats, warmup=args.warmup, nbits_kernel=args.nbits_kernel,
                          rotate=args.rotated, kernel_times=args.op_times)
    quiet = args.quiet or args.json
    result = bench_linears(opts, progress=None if quiet else lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result) if args.json else format_linears(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
