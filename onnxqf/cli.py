"""The `onnxqf` command line: export, rewrite, eval, check, inspect."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from onnxqf.errors import OnnxqfError

DESCRIPTION = """\
Make an LLM's activations quantization-friendly inside its ONNX graph, then quantize it to int8.

  onnxqf export smollm2 -o out/smollm2.onnx            # built-in SmolLM2-135M-Instruct
  onnxqf rewrite out/smollm2.onnx --hybrid              # smooth, rotate, W8A8 -> out/smollm2.hybrid.onnx
  onnxqf eval out/smollm2.onnx out/smollm2.hybrid.onnx --text wiki.test.raw
  onnxqf check out/smollm2.hybrid.onnx --ep cuda        # every node on the GPU?
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
    p = argparse.ArgumentParser(prog="onnxqf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"onnxqf {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser("export", help="export a Hugging Face causal LM to ONNX",
                       description="Export a causal LM (the built-in 'smollm2', a Hugging Face model directory, or a .gguf file) "
                                   "to ONNX: input_ids -> logits, dynamic batch and sequence, opset 18, weights as external data "
                                   "(OUT.data), the tokenizer saved beside it (OUT.tokenizer/).")
    e.add_argument("source", nargs="?", default="smollm2", help="'smollm2' (default), a model directory or a .gguf file")
    e.add_argument("-o", "--output", required=True, help="output .onnx path")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weight and compute dtype (default float32)")

    r = sub.add_parser("rewrite", help="fold, smooth, rotate and quantize an exported model",
                       description="Rewrite an ONNX LLM. With no transform flag it only quantizes (W8A8). "
                                   "--smooth: SmoothQuant scales folded into norms/v_proj/up_proj. "
                                   "--rotate: randomized Hadamard rotation of the residual stream (folded), online Hadamard before "
                                   "down_proj, value/output head rotation. --hybrid: calibrated smoothing of o_proj/down_proj inputs "
                                   "*before* the rotation, then the rotation. The input file is never modified.")
    r.add_argument("model", help="input .onnx (e.g. from `onnxqf export`)")
    r.add_argument("-o", "--output", help="output .onnx (default: MODEL with .<preset>.onnx)")
    g = r.add_argument_group("transforms")
    g.add_argument("--rotate", action="store_true", help="rotate with randomized Hadamard matrices")
    g.add_argument("--smooth", action="store_true", help="channel-wise scaling (SmoothQuant)")
    g.add_argument("--hybrid", action="store_true", help="smoothing before rotation (needs calibration text)")
    q = r.add_argument_group("quantization")
    q.add_argument("--quant", choices=["int8", "none"], default="int8", help="int8 W8A8 MatMulInteger (default), or none for a float model")
    q.add_argument("--act-quant", choices=["token", "tensor"], default="token",
                   help="token: per-token symmetric int8, all nodes on CUDA (default); tensor: DynamicQuantizeLinear (CPU runtimes)")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (kept float by default)")
    q.add_argument("--weight-rounding", choices=["gptq", "rtn"], default="gptq",
                   help="gptq: error-compensating rounding with the calibration inputs' X^T X (default); rtn: round to nearest")
    q.add_argument("--clip-search", action="store_true", help="search a clipping ratio per weight channel (scales)")
    q.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                   help="leave matching linears in float, e.g. down_proj or 'layers.29.*' (repeatable)")
    c = r.add_argument_group("calibration (for --smooth / --hybrid and GPTQ weight rounding)")
    c.add_argument("--calib", default="builtin", help="calibration text file or .npy of token ids (default: a built-in English text)")
    c.add_argument("--calib-windows", type=_positive, default=8, help="number of windows (default 8)")
    c.add_argument("--calib-seq", type=_positive, default=512, help="tokens per window (default 512)")
    c.add_argument("--alpha", type=_alpha, default="auto", help="smoothing strength in [0, 1], or 'auto': per layer, by measured quantization error (default)")
    c.add_argument("--tokenizer", help="tokenizer folder (default: the one saved beside the model by `onnxqf export`)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random signs and rotations")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    v = sub.add_parser("eval", help="KL divergence, perplexity and top-1 agreement of NEW against ORIG",
                       description="Run both models on the same windows of text and report KL(P_orig || P_new) in nats/token over "
                                   "all positions, the perplexity of both, and top-1 agreement.")
    v.add_argument("orig")
    v.add_argument("new")
    _text_args(v, windows=16, tokenizer_of="ORIG")
    v.add_argument("--ep", choices=["cpu", "cuda"], default="cpu", help="execution provider (default cpu)")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    v.add_argument("--max-kl", type=float, help="exit 1 if KL exceeds this (CI gate)")

    k = sub.add_parser("check", help="check node placement on an execution provider (CI gate)",
                       description="Create an ONNX Runtime session with CPU fallback disabled and report where every node runs. "
                                   "Exit 0: every node on the provider, no Memcpy; 1: some nodes would fall back or copies are "
                                   "inserted; 2: bad input; 3: the provider is not available here (skipped).")
    k.add_argument("model")
    k.add_argument("--ep", choices=["cuda", "cpu"], default="cuda")
    k.add_argument("--json", action="store_true")

    n = sub.add_parser("inspect", help="quantization difficulty per layer: original / smooth / rotate / smooth+rotate",
                       description="Capture the inputs of every linear (q/k/v, o_proj, gate/up, down_proj) on windows of text, "
                                   "with the norm scales folded into the weights, and measure per layer how hard they are to "
                                   "quantize as they are, smoothed (X/s, diag(s)B), rotated (XQ, Q^T B) and smoothed then "
                                   "rotated: difficulty (std of channel L2 norms) of activations and weights, max|x|, and the "
                                   "layer error ||XB - Q(X')Q(B')||^2 at 8 and 4 bits. Writes metrics.csv, metrics.json and "
                                   "PNG plots to --out; no model is written.")
    n.add_argument("model", help="an .onnx LLM (e.g. from `onnxqf export`)")
    _text_args(n, windows=8, tokenizer_of="the model")
    n.add_argument("--layers", help="layers to inspect, e.g. '0,5,10-12' (default: all)")
    n.add_argument("--alpha", type=_alpha, default=0.5, help="smoothing strength in [0, 1] (default 0.5)")
    n.add_argument("--out", help="output folder (default: MODEL without .onnx, plus -inspect); replaced only when done")
    n.add_argument("--heatmap-layer", type=int, metavar="K",
                   help="layer of the token x channel heatmaps (default: the layer with the largest down_proj input)")
    n.add_argument("--seed", type=int, default=0, help="seed of the random Hadamard signs (default 0)")
    n.add_argument("--json", action="store_true", help="print one JSON object with the summary instead of a table")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"export": cmd_export, "rewrite": cmd_rewrite, "eval": cmd_eval, "check": cmd_check, "inspect": cmd_inspect}[args.command](args)
    except OnnxqfError as exc:
        print(f"onnxqf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxqf: interrupted", file=sys.stderr)
        return 130


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def cmd_export(args) -> int:
    from onnxqf.models.export import export

    out = Path(args.output)
    if out.suffix != ".onnx":
        raise OnnxqfError(f"{out}: the output name must end in .onnx")
    export(args.source, out, dtype=args.dtype)
    print(out)
    return 0


def _default_output(model: Path, args) -> Path:
    tag = "hybrid" if args.hybrid else "-".join(t for t, on in (("smooth", args.smooth), ("rotate", args.rotate)) if on) or "w8a8"
    if args.quant == "none":
        tag += ".float"
    elif args.act_quant == "tensor":
        tag += ".tensor"
    return model.with_name(f"{model.stem}.{tag}.onnx")


def cmd_rewrite(args) -> int:
    from onnxqf.data import load_tokenizer
    from onnxqf.modelfile import load_model, save_model, set_metadata, get_metadata
    from onnxqf.models.export import TOKENIZER_SUFFIX, copy_tokenizer_dir
    from onnxqf.pipeline import RewriteOptions, rewrite

    src = Path(args.model)
    out = Path(args.output) if args.output else _default_output(src, args)
    if out.suffix != ".onnx":
        raise OnnxqfError(f"{out}: the output name must end in .onnx")
    if out.exists() and src.exists() and _same_file(src, out):
        raise OnnxqfError("the output would overwrite the input; choose another -o")
    opts = RewriteOptions(rotate=args.rotate, smooth=args.smooth, hybrid=args.hybrid, quant=args.quant,
                          act_quant=args.act_quant, alpha=args.alpha, calib=args.calib, calib_windows=args.calib_windows,
                          calib_seq=args.calib_seq, quantize_lm_head=args.quantize_lm_head, clip_search=args.clip_search,
                          keep_float=tuple(args.keep_float), weight_rounding=args.weight_rounding,
                          seed=args.seed, progress=not args.quiet)
    opts.validate()
    model = load_model(src)
    needs_calib = args.smooth or args.hybrid or (args.quant == "int8" and args.weight_rounding == "gptq")
    tokenizer = load_tokenizer(src, model, args.tokenizer) if needs_calib and not args.calib.endswith(".npy") else None
    report = rewrite(model, opts, tokenizer)
    set_metadata(model, "rewrite", json.dumps(report))
    tok_rel = get_metadata(model, "tokenizer")
    tok_src = src.parent / tok_rel if tok_rel else None
    if tok_src is not None and tok_src.is_dir():
        tok_dst = out.parent / (out.name + TOKENIZER_SUFFIX)
        if not (tok_dst.exists() and _same_file(tok_src, tok_dst)):
            copy_tokenizer_dir(tok_src, tok_dst)
        set_metadata(model, "tokenizer", tok_dst.name)
    save_model(model, out)
    if not args.quiet:
        print(f"[onnxqf] {opts.label}: {report.get('quantized', 0)} MatMuls quantized, {report['seconds']} s", file=sys.stderr)
    print(out)
    return 0


def cmd_eval(args) -> int:
    from onnxqf.data import token_windows
    from onnxqf.evaluate import compare, format_table, to_json
    from onnxqf.modelfile import load_model

    orig = load_model(args.orig)  # validates the file before ONNX Runtime sees it
    load_model(args.new)
    wins = token_windows(args.text or args.tokens, args.orig, orig, args.windows, args.seq,
                         tokenizer=args.tokenizer, vocab=_vocab(orig))
    del orig
    result = compare(args.orig, args.new, wins, ep=args.ep, progress=not args.json, max_abs=True)
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


def cmd_check(args) -> int:
    from onnxqf.modelfile import load_model
    from onnxqf.placement import check_placement, format_placement

    model = load_model(args.model)
    result = check_placement(args.model, args.ep)
    if result["status"] == "unavailable" and args.ep == "cuda":
        from onnxqf.placement import static_issues

        result["static_issues"] = static_issues(model)  # what is known without a GPU
    print(json.dumps(result) if args.json else format_placement(result))
    if result["status"] == "unavailable":
        return 3
    return 0 if result["status"] == "ok" else 1


def cmd_inspect(args) -> int:
    from onnxqf.inspection import InspectOptions, print_report, run_inspect

    opts = InspectOptions(windows=args.windows, seq=args.seq, layers=args.layers, alpha=args.alpha,
                          heatmap_layer=args.heatmap_layer, seed=args.seed, progress=not args.json)
    result = run_inspect(args.model, args.text or args.tokens, args.out, opts, tokenizer_dir=args.tokenizer)
    print_report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
