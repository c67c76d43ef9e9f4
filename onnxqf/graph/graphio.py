"""What an LLM graph reads and writes: token ids, attention mask, positions, KV cache, logits.

One description (:class:`GraphIO`) for every command that feeds a graph: bench, eval, calibration
(whole graph or layer by layer), placement and generation. It is read from the graph's declared
inputs and outputs (and the attributes of its attention nodes): external data is never loaded, so
describing a 7B model costs nothing.

Rules (the layouts onnxqf drives: its own logits-only export and onnxruntime-genai's KV-cache graphs):

- **ids**: the input ``input_ids``; a graph without it is fed through its first input (a plain
  export whose input has another name).
- **mask**, **positions**: the inputs ``attention_mask`` and ``position_ids``, when present.
- **KV cache**: every input whose name starts with ``past_`` (onnxruntime-genai:
  ``past_key_values.N.key|value``, ``[batch, kv_heads, past, head_dim]``), in layer order, each
  paired with the output ``present.N.key|value`` (None when the graph has no such output). All
  cache inputs share one dtype and one ``[kv_heads, head_dim]`` (every decoder onnxqf handles;
  anything else is refused here). A dim the graph leaves symbolic (onnxruntime-genai names
  head_dim ``kv_cache_dim`` in some graphs) is None until the caller supplies it
  (:meth:`GraphIO.with_kv_shape`: from a ``genai_config.json`` or a recognized structure).
- **least past**: a cache input read by a ``GroupQueryAttention`` that keeps a sliding-window cache
  (``sliding_window_cache`` set, ``local_window_size`` > 0: Gemma 2's local layers in onnxruntime-genai's
  builder) must hold at least ``local_window_size`` positions, even when none of them is valid
  (ONNX Runtime refuses an empty one): ``min_past`` maps such inputs to that size.
- **conv state**: the inputs ``past.N.conv`` (onnxruntime-genai's LFM2: the last ``L - 1`` inputs of layer N's
  short convolution, ``[batch, channels, L - 1]`` with static channels and width), each paired with the output
  ``present.N.conv``. A whole-sequence forward feeds zeros: the convolution's causal padding, what the plain
  export computes.
- **logits**: the output ``logits``, else the first output.
- Any other input is listed in ``unknown``: callers that feed the graph refuse it.

Which of these a command requires (bench wants a ``logits`` output and matching ``present``
outputs; feeding wants known cache dims) is checked by that command; :meth:`GraphIO.check_feedable`
holds the rules every feed shares.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from onnxqf.errors import BadModelFileError, OnnxqfError

__all__ = ["CACHE_PREFIX", "CONV_STATE_RE", "GraphIO", "PAST_RE"]

CACHE_PREFIX = "past_"
#: onnxruntime-genai's cache input names; the matching output is ``present.N.key|value``
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
#: onnxruntime-genai's conv-state input names (LFM2); the matching output is ``present.N.conv``
CONV_STATE_RE = re.compile(r"^past\.(\d+)\.conv$")
IDS, MASK, POSITIONS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


@dataclasses.dataclass(frozen=True)
class _Arg:
    """One declared graph input or output: name, ONNX element type, dims (int, a symbol's name or None)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None  # None: no shape declared

    def dtype(self) -> np.dtype | None:
        from onnx import helper

        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))
        except Exception:  # an undefined or unknown element type
            return None

    def static(self, axis: int) -> int | None:
        if self.dims is None or not -len(self.dims) <= axis < len(self.dims):
            return None
        d = self.dims[axis]
        return d if isinstance(d, int) and d > 0 else None


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs of an LLM graph (see the module doc for how each is found).

    ``cache`` holds ``(past input, present output or None)`` pairs in layer order (key before value);
    ``int_types`` the numpy dtypes of ids / mask / positions; ``vocab`` the static last dim of the
    logits, when declared.
    """

    path: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ids: str | None
    mask: str | None = None
    positions: str | None = None
    cache: tuple[tuple[str, str | None], ...] = ()
    cache_dtype: np.dtype | None = None
    cache_rank: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    logits: str | None = None
    logits_dtype: np.dtype | None = None
    vocab: int | None = None
    int_types: dict[str, np.dtype] = dataclasses.field(default_factory=dict)
    unknown: tuple[str, ...] = ()
    min_past: dict[str, int] = dataclasses.field(default_factory=dict)
    # (past.N.conv input, present.N.conv output or None) in layer order, and each input's (channels, width, dtype),
    # None where the graph leaves a dim symbolic
    conv_state: tuple[tuple[str, str | None], ...] = ()
    conv_shapes: dict[str, tuple[int | None, int | None, np.dtype | None]] = dataclasses.field(default_factory=dict)

    @property
    def has_cache(self) -> bool:
        return bool(self.cache)

    @property
    def is_kv(self) -> bool:
        """A graph fed more than token ids (a mask, positions or a cache): onnxruntime-genai's layout."""
        return bool(self.mask or self.positions or self.cache or self.conv_state)

    @property
    def kv_shape_known(self) -> bool:
        return not self.cache or (self.kv_heads is not None and self.head_dim is not None)

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GraphIO":
        """The description of the ``.onnx`` file ``path`` (its external data is not loaded)."""
        import onnx

        p = Path(path)
        if not p.is_file():
            raise BadModelFileError(f"{p}: no such file")
        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            text = str(exc).strip().splitlines()
            why = text[0][:200] if text else type(exc).__name__
            raise BadModelFileError(f"{p}: not a readable ONNX model ({why})") from None
        return cls.from_proto(proto, path=str(p))

    @classmethod
    def from_proto(cls, proto, path: str | None = None) -> "GraphIO":
        """The description of an ``onnx.ModelProto`` (or ``GraphProto``)."""
        graph = getattr(proto, "graph", proto)
        inits = {t.name for t in graph.initializer}

        def arg(v) -> _Arg:
            tt = v.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                             for d in tt.shape.dim)
            return _Arg(v.name, int(tt.elem_type), dims)

        from onnx import helper

        windows = [({a.name: helper.get_attribute_value(a) for a in n.attribute}, list(n.input))
                   for n in graph.node if n.op_type == "GroupQueryAttention"]
        return cls._build([arg(v) for v in graph.input if v.name not in inits], [arg(v) for v in graph.output], path,
                          _min_past(windows))

    @classmethod
    def from_model(cls, model, path: str | None = None) -> "GraphIO":
        """The description of an in-memory ``onnx_ir.Model`` (its inputs as declared, initializers left out)."""

        def arg(v) -> _Arg:
            dims = None
            if v.shape is not None:
                dims = tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in v.shape)
            return _Arg(v.name, int(v.dtype) if v.dtype is not None else 0, dims)

        inputs = [arg(v) for v in model.graph.inputs if not v.is_initializer()]
        windows = [({k: a.value for k, a in n.attributes.items()}, [v.name if v is not None else "" for v in n.inputs])
                   for n in model.graph if n.op_type == "GroupQueryAttention"]
        return cls._build(inputs, [arg(v) for v in model.graph.outputs], path, _min_past(windows))

    @classmethod
    def _build(cls, inputs: list[_Arg], outputs: list[_Arg], path: str | None,
               min_past: dict[str, int] | None = None) -> "GraphIO":
        where = path or "model"
        in_names = {a.name for a in inputs}
        out_by_name = {a.name: a for a in outputs}
        ids = IDS if IDS in in_names else (inputs[0].name if inputs else None)
        logits = out_by_name.get(LOGITS) or (outputs[0] if outputs else None)
        int_types: dict[str, np.dtype] = {}
        mask = positions = None
        cache: list[tuple[int, int, str, str | None]] = []  # (layer, order, past, present)
        cache_args: list[_Arg] = []
        conv: list[tuple[int, str, str | None]] = []
        conv_shapes: dict[str, tuple[int | None, int | None, np.dtype | None]] = {}
        unknown = []
        for a in inputs:
            m = CONV_STATE_RE.match(a.name)
            if m and a.dims is not None and len(a.dims) == 3:
                present = f"present.{m.group(1)}.conv"
                conv.append((int(m.group(1)), a.name, present if present in out_by_name else None))
                conv_shapes[a.name] = (a.static(1), a.static(2), a.dtype())
            elif a.name == ids:
                int_types[a.name] = a.dtype() or np.dtype(np.int64)
            elif a.name == MASK:
                mask = a.name
                int_types[a.name] = a.dtype() or np.dtype(np.int64)
            elif a.name == POSITIONS:
                positions = a.name
                int_types[a.name] = a.dtype() or np.dtype(np.int64)
            elif a.name.startswith(CACHE_PREFIX):
                m = PAST_RE.match(a.name)
                present = f"present.{m.group(1)}.{m.group(2)}" if m else None
                present = present if present in out_by_name else None
                layer = int(m.group(1)) if m else len(cache)
                cache.append((layer, len(cache), a.name, present))
                cache_args.append(a)
            else:
                unknown.append(a.name)
        fields: dict = {}
        if cache_args:
            first = cache_args[0]
            for a in cache_args[1:]:
                if a.elem_type != first.elem_type or a.static(1) != first.static(1) or a.static(3) != first.static(3) \
                        or (a.dims is None) != (first.dims is None) or len(a.dims or ()) != len(first.dims or ()):
                    raise OnnxqfError(f"{where}: '{a.name}' differs in dtype or shape from the other cache inputs")
            fields = {"cache_dtype": first.dtype(), "cache_rank": None if first.dims is None else len(first.dims),
                      "kv_heads": first.static(1), "head_dim": first.static(3)}
        cache.sort(key=lambda c: (c[0], c[2]))
        return cls(path=path, inputs=tuple(a.name for a in inputs), outputs=tuple(a.name for a in outputs), ids=ids,
                   mask=mask, positions=positions, cache=tuple((c[2], c[3]) for c in cache),
                   logits=logits.name if logits else None, logits_dtype=logits.dtype() if logits else None,
                   vocab=logits.static(-1) if logits else None, int_types=int_types, unknown=tuple(unknown),
                   min_past={k: v for k, v in (min_past or {}).items() if k in in_names},
                   conv_state=tuple((c[1], c[2]) for c in sorted(conv)), conv_shapes=conv_shapes, **fields)

    # -- completing and checking ----------------------------------------------------------------

    def with_kv_shape(self, kv_heads: int, head_dim: int) -> "GraphIO":
        """The same description with the cache dims the graph leaves symbolic set to ``kv_heads`` / ``head_dim``
        (static dims are kept: the graph's word wins); unchanged without a cache."""
        if not self.cache:
            return self
        return dataclasses.replace(self, kv_heads=self.kv_heads or int(kv_heads),
                                   head_dim=self.head_dim or int(head_dim))

    def check_feedable(self) -> None:
        """The rules of every feed: OnnxqfError (one line) for an input onnxqf does not know how to feed, a
        cache input that is not ``[batch, kv_heads, past, head_dim]`` of float32 / float16, or cache dims
        that are still unknown."""
        where = self.path or "model"
        if self.ids is None:
            raise OnnxqfError(f"{where}: the graph has no input to feed token ids to")
        if self.is_kv and self.unknown:
            raise OnnxqfError(f"{where}: graph input '{self.unknown[0]}' is not one onnxqf knows how to feed")
        for name, _ in self.conv_state:
            channels, width, dtype = self.conv_shapes[name]
            if channels is None or width is None or dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
                raise OnnxqfError(f"{where}: conv-state input '{name}' is not [batch, channels, width] with static "
                                  "channels and width, of float32 or float16")
        if not self.cache:
            return
        name = self.cache[0][0]
        if self.cache_rank != 4:
            raise OnnxqfError(f"{where}: graph input '{name}' is not one onnxqf knows how to feed "
                              "(a KV cache is [batch, kv_heads, past, head_dim])")
        if self.cache_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise OnnxqfError(f"{where}: KV-cache input '{name}' has dtype {self.cache_dtype} "
                              "(float32 or float16 supported)")
        if not self.kv_shape_known:
            raise OnnxqfError(f"{where}: cannot tell the KV-cache shape of '{name}' (kv_heads, head_dim) without its "
                              "genai_config.json")


def _min_past(nodes: list[tuple[dict, list[str]]]) -> dict[str, int]:
    """past input -> the least number of positions its GroupQueryAttention accepts, from ``(attributes,
    input names)`` of each such node: its ``local_window_size`` where it keeps a sliding-window cache
    (``sliding_window_cache``), the inputs past_key (3) and past_value (4); other nodes accept an empty past."""
    out: dict[str, int] = {}
    for attrs, names in nodes:
        window = int(attrs.get("local_window_size", -1) or -1)
        if not attrs.get("sliding_window_cache") or window <= 0:
            continue
        for name in names[3:5]:
            if name:
                out[name] = max(out.get(name, 0), window)
    return out
