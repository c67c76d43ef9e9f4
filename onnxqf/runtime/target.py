"""Execution-provider targets: what is true of one ONNX Runtime provider, in one place.

A :class:`Target` owns:

- which lowering each quantized format gets on its provider (W8A8 and weight-only: :meth:`Target.lowering`);
- the placement rules of its provider: op types it has no kernel for, and the rules of each lowering's
  nodes (:meth:`Target.node_issues`, checked without running anything, in CI too);
- the session it runs graphs in: provider name, provider options, custom-op libraries (:meth:`Target.session`);
- how a missing provider is reported: :class:`onnxqf.errors.ProviderUnavailableError`, exit code 3, for every
  command.

``onnxqf rewrite --ep cpu|cuda`` picks the target (onnxruntime-genai's model builder calls it ``-e``). Without
``--ep`` the target of an onnxruntime-genai folder is the provider its ``genai_config.json`` names (cpu when it
names none); a plain graph's is ``cuda`` for float16 weights and ``cpu`` for float32 (the builder's own
convention: ``-p fp16`` goes with ``-e cuda``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx_ir as ir

from onnxqf.errors import OnnxqfError, ProviderUnavailableError
from onnxqf.graph.edit import OnlineStyle
from onnxqf.lowering import base as lowering_base
from onnxqf.lowering.nbits import MatMulNBits

__all__ = ["Target", "TARGETS", "get_target", "default_target_name", "genai_provider", "METADATA_TARGET",
           "METADATA_LOWERING", "u8s8_saturates", "with_cpu_weights"]

#: model metadata keys where ``rewrite`` records what it lowered for (``check`` compares them with ``--ep``)
METADATA_TARGET = "onnxqf.target"
METADATA_LOWERING = "onnxqf.lowering"


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this machine's ONNX Runtime CPU kernel for uint8 x int8 MatMulInteger gives wrong sums: on x86 CPUs
    with AVX2 but without VNNI it adds pairs of u8 x s8 products in int16 with saturation. Probed by one product
    (64 x 255 x 127, whose pairs overflow int16); False where onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.full((64, 8), 127, np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 8])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = session.run(None, {"a": np.full((1, 64), 255, np.uint8)})[0]
    return bool((y != 64 * 255 * 127).any())


def with_cpu_weights(cls, kwargs: dict) -> dict:
    """``kwargs`` for the W8A8 lowering class ``cls`` on this machine's CPU: uint8 weights where the u8 x s8 kernel
    saturates (:func:`u8s8_saturates`) and the caller did not choose."""
    if getattr(cls, "uint8_activations", False) and "uint8_weights" not in kwargs and u8s8_saturates():
        return {**kwargs, "uint8_weights": True}
    return kwargs


@dataclasses.dataclass(frozen=True)
class Target:
    """One execution provider.

    Attributes:
        name: ``cpu`` or ``cuda`` (the ``--ep`` value).
        provider: ONNX Runtime's provider name.
        w8a8: the W8A8 lowering per activation kind (``token``, ``asym``, ``iter``, ``tensor``).
        nbits_accuracy_level: MatMulNBits ``accuracy_level`` (4 on the CPU: int8 compute inside the op).
        no_kernel: op types this provider has no kernel for (they would run on the CPU, with copies).
        online: how online rotations are emitted (:class:`onnxqf.graph.edit.OnlineStyle`: measured per provider).
    """

    name: str
    provider: str
    w8a8: dict[str, str]
    nbits_accuracy_level: int
    no_kernel: frozenset[str] = frozenset()
    online: OnlineStyle = OnlineStyle()

    # -- lowerings ----------------------------------------------------------------------------------
    def head_lowering(self, quant) -> lowering_base.Lowering | None:
        """lm_head's own lowering, when the config gives it one (W8A8 with ``lm_head_bits``), else None."""
        if quant.format == "int8" and quant.lm_head_bits is not None:
            return MatMulNBits(bits=quant.lm_head_bits, block_size=32, accuracy_level=self.nbits_accuracy_level,
                               lm_head_bits=quant.lm_head_bits)
        return None

    def lowering(self, quant) -> lowering_base.Lowering:
        """The lowering of a quantization config (:mod:`onnxqf.options`) on this target: the config's own
        ``lowering`` when it names one, else this target's choice for the format."""
        if quant.format == "int8":
            # (a W8A8 config only names a W8A8 lowering: onnxqf.options.W8A8 checks it)
            acts = quant.activations
            cls, kwargs = lowering_base.parse_spec(quant.lowering or self.w8a8[acts or "token"])
            kinds = getattr(cls, "activations", ("token",))
            if acts not in (None, "token") and acts not in kinds:
                raise OnnxqfError(f"--lowering {cls.name} makes {' or '.join(kinds)} activations, not --act-quant "
                                  f"{acts} (leave out --lowering for this target's choice)")
            if acts is not None and "asymmetric" in {f.name for f in dataclasses.fields(cls)}:
                if "asymmetric" in kwargs and bool(kwargs["asymmetric"]) != (acts == "asym"):
                    raise OnnxqfError(f"--lowering {quant.lowering} and --act-quant {acts} disagree on the "
                                      "asymmetric codes: give one of them")
                kwargs.setdefault("asymmetric", acts == "asym")  # (None: the lowering's own default)
            kwargs = {"clip_search": quant.clip_search, **kwargs}
            return cls(**(with_cpu_weights(cls, kwargs) if self.name == "cpu" else kwargs))
        level = self.nbits_accuracy_level if quant.accuracy_level is None else quant.accuracy_level
        return MatMulNBits(bits=quant.bits, block_size=quant.block_size, symmetric=not quant.asymmetric,
                           clip_search=quant.clip_search, act_order=quant.act_order, damp=quant.damp,
                           accuracy_level=level, lm_head_bits=quant.lm_head_bits)

    # -- placement ----------------------------------------------------------------------------------
    def node_issues(self, model: ir.Model) -> list[str]:
        """Nodes that this provider cannot run, or runs on a slow path (by op type, input types and the rules of
        the lowering that emits them); and a graph lowered for another target (its recorded metadata)."""
        issues = []
        recorded = model.metadata_props.get(METADATA_TARGET)
        if recorded and recorded != self.name:
            lowering = model.metadata_props.get(METADATA_LOWERING, "?")
            issues.append(f"the graph was lowered for --ep {recorded} ({lowering}), not {self.name}: "
                          f"rewrite the original with --ep {self.name}")
        lowerings = [lowering_base.get(name)() for name in lowering_base.names("int8")]
        for node in model.graph.all_nodes():
            if node.op_type in self.no_kernel:
                issues.append(f"{node.op_type} '{node.name}': no {self.provider} kernel")
                continue
            for lowering in lowerings:
                issue = lowering.node_issue(node, self.name)
                if issue:
                    issues.append(issue)
                    break
            else:
                if self.name == "cpu" and _u8s8_product(node) and u8s8_saturates():
                    issues.append(f"{node.op_type} '{node.name}': uint8 x int8 products saturate in this CPU's ONNX "
                                  "Runtime kernel (AVX2 without VNNI): rewrite with --ep cpu on this machine "
                                  "(uint8 weights)")
        return issues

    # -- sessions -----------------------------------------------------------------------------------
    def require(self, rt) -> None:
        """Check that the onnxruntime module ``rt`` has this provider (else ProviderUnavailableError, exit 3)."""
        if self.provider not in rt.get_available_providers():
            hint = " (pip install 'onnxqf[gpu]' for the CUDA provider)" if self.name == "cuda" else ""
            raise ProviderUnavailableError(f"{self.provider} is not available in this onnxruntime build "
                                           f"({rt.__version__}){hint}")

    def custom_op_libraries(self, domains: set[str]) -> list:
        """The custom-op libraries a graph importing ``domains`` needs on this target (onnxqf's CUDA kernels for the
        ``onnxqf`` domain, its CPU op library for ``onnxqf.cpu``); one clear line when this target cannot run them."""
        from onnxqf.runtime import kernels

        if kernels.DOMAIN in domains and self.name != "cuda":
            raise OnnxqfError(f"the graph uses onnxqf's CUDA kernels (domain '{kernels.DOMAIN}'): they run on --ep "
                              "cuda only")
        if kernels.CPU_DOMAIN in domains and self.name != "cpu":
            raise OnnxqfError(f"the graph uses onnxqf's CPU op library (domain '{kernels.CPU_DOMAIN}'): it runs on "
                              "--ep cpu only")
        return kernels.libraries_for(domains)

    def providers(self, provider_options: dict | None = None) -> list:
        """The ``providers`` argument of an InferenceSession on this target."""
        return [(self.provider, dict(provider_options))] if provider_options else [self.provider]


TARGETS: dict[str, Target] = {
    # measured on a 16-core Sapphire Rapids (docs/benchmarks.md, CPU section): uint8-token-ql prefills 1.4x faster
    # than uint8-token at 256 tokens; online rotations as batched GEMMs of factors <= 64 take 102 ms of prefill
    # where the transposing emission takes 472 (the CPU's Transpose is the cost)
    "cpu": Target("cpu", "CPUExecutionProvider",
                  w8a8={"token": "uint8-token-ql", "asym": "uint8-token-asym", "iter": "uint8-token-iter",
                        "tensor": "uint8-tensor"},
                  nbits_accuracy_level=4, online=OnlineStyle(max_group=64, batched=True)),
    # online rotations as GEMMs on the last axis + Transposes: a broadcast left-multiplication is a pointer-array
    # batched GEMM on CUDA, 15x slower (docs/benchmarks.md, section b)
    "cuda": Target("cuda", "CUDAExecutionProvider",
                   w8a8={"token": "int8-token", "asym": "int8-token-asym", "iter": "int8-token-iter",
                         "tensor": "uint8-tensor"},
                   nbits_accuracy_level=0,
                   no_kernel=frozenset({"DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise OnnxqfError(f"unknown execution provider '{name}' (use {' or '.join(TARGETS)})") from None


def default_target_name(dtype: ir.DataType, genai_provider: str | None = None) -> str:
    """The target of a rewrite without ``--ep``: a genai folder's provider (``genai_provider``: "" when its
    config names none), else cuda for float16 models, cpu otherwise (see the module docstring)."""
    if genai_provider is not None:
        return genai_provider if genai_provider in TARGETS else "cpu"
    return "cuda" if dtype == ir.DataType.FLOAT16 else "cpu"


def genai_provider(decoder: dict) -> str:
    """The provider an onnxruntime-genai ``model.decoder`` config runs on: the first entry of its
    ``session_options.provider_options`` (``[{"cuda": {...}}]``), "" when it names none (the CPU)."""
    for entry in decoder.get("session_options", {}).get("provider_options", []) or []:
        for name in entry:
            return str(name).lower()
    return ""


def _u8s8_product(node: ir.Node) -> bool:
    """A MatMulInteger / MatMulIntegerToFloat whose weights (input 1, an initializer) are int8 and whose activations
    are not int8 (uint8 codes)."""
    if node.op_type not in ("MatMulInteger", "MatMulIntegerToFloat") or len(node.inputs) < 2:
        return False
    a, w = node.inputs[0], node.inputs[1]
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.INT8:
        return False
    return a is None or a.dtype != ir.DataType.INT8
