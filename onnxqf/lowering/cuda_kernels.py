"""W8A8 through onnxqf's own CUDA kernels: one fused node per linear group (``--lowering onnxqf-cuda``).

The group's int8 weights (rounded as every W8A8 lowering rounds them) are concatenated along the output channels and
stored transposed, ``[N, K]`` ("TN", what the int8 tensor cores read), and the whole linear is one node of the
``onnxqf`` domain, from ``kernels/`` (``onnxqf.runtime.kernels``)::

    y... = onnxqf.W8A8Linear(x, Wq[N, K] int8, wscale[N] float32)    (one output per linear of the group:
                                                                      output_sizes = their N's)

which computes, inside one op, exactly what ``int8-token`` computes with standard ops (kernels/README.md)::

    amax = max(max|x| per token, 1e-4); codes = Round(x * (127 / amax))     (float16, as the graph does)
    y    = Cast<f16>(Cast<f32>(codes @ Wq^T) * amax * wscale),  wscale = w_scale / 127 (float32)

so its outputs are those of ``int8-token`` to the bit.

When the group's activation is the output of an online rotation (``--hybrid``'s down_proj, o_proj and lm_head inputs)
of at most two Kronecker groups ``x @ kron(A, B)`` that fit the kernel (:func:`kernel_rotation`), the rotation moves
into the op: it reads the unrotated activation and rotates each token inside its quantization (``rotation_block`` =
b, inputs RA = A^T padded, RB = B: tensor-core products; a factor that is Sylvester's Hadamard matrix, as every
power-of-two part of onnxqf's rotations is, goes as a bit of ``rotation_walsh`` instead and runs as a fast
Walsh-Hadamard transform), and the block of Reshape / MatMul / Transpose nodes goes.
Its codes then equal the standard graph's up to the fp16 rounding of the rotated values (another summation order).

When the group's activation is SwiGLU's product ``Mul(Mul(g, Sigmoid(g)), u)`` (down_proj of Llama-like MLPs; either
operand order, float16, the intermediate values read by nothing else) the op takes g and u instead (``input_glu`` = 1,
u its last input) and computes the product inside its quantization, in the same fp16 steps as those three nodes, which
go: three fewer passes over the MLP's widest activation (:func:`swiglu_of`).

When the group's activation is output 0 of ONNX Runtime's ``SkipSimplifiedLayerNormalization(a, skip, gamma)``
(the model builder's fused residual add + RMSNorm in front of q/k/v, gate/up and lm_head; read by nothing but the
group, its mean and inverse-deviation outputs unread, no bias) the op takes a, skip and gamma instead (``skip_norm``,
attribute ``epsilon``) and normalizes each token itself before quantizing it; the sum ``a + skip`` that the node
wrote as its output 3 (the residual stream the next norm adds to) becomes the op's last output (``skip_norm`` = 2),
and the node goes: at one token, one kernel fewer per norm (:func:`skip_norm_of`). The op sums the squares in fp32
where ONNX Runtime's fp16 kernel sums in fp16, so its normalized values may differ from the node's in the last fp16
bit (the sum is the same to the bit).

With ``asymmetric`` (``--act-quant asym``; symmetric by default) the op makes ``int8-token-asym``'s codes instead
(a step and a zero point per token, :func:`onnxqf.lowering.w8a8.asymmetric_codes`, stored as ``code - 128``) and takes
the zero point off after its integer product, as that graph's rank-one correction does with the weights'
per-channel sums (input ``Wsum``, index 9; ``wscale`` is then the weight's step itself)::

    y = Cast<f16>(((Cast<f32>(codes @ Wq^T) - (zp - 128) * Wsum) * s) * wscale)

so its outputs are those of ``int8-token-asym`` to the bit (behind an online rotation taken into the op, to the fp16
rounding of the rotated values, as above).

The op has a CUDA kernel only, for sm_90a (H100/H200), and
takes float16 activations: float32 models are refused. Sessions that run the graph must load the library
(:func:`onnxqf.runtime.kernels.register`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.lowering.base import LinearGroup, register, replace_outputs, take_over
from onnxqf.lowering.w8a8 import W8A8Lowering
from onnxqf.maths.hadamard import walsh_matrix, walsh_sign
from onnxqf.maths.layout import transpose_copy

__all__ = ["DOMAIN", "MAX_OUTPUTS", "OP", "ROTATE_MAX_SMEM", "SKIP_NORM_EPSILON", "KernelRotation", "OnnxqfCudaW8A8",
           "SkipNorm", "SwiGlu", "balance_factors", "emit_w8a8_kernel", "kernel_rotation", "kron_split", "skip_norm_of",
           "swiglu_of"]

DOMAIN = "onnxqf"  # = onnxqf.runtime.kernels.DOMAIN (not imported: lowering needs no GPU library)
OP = "W8A8Linear"
ROTATE_MAX_SMEM = 200 * 1024  # = kRotateMaxSmem in kernels/src/kernels.h: the op's shared memory for one row
MAX_OUTPUTS = 4  # = kMaxOutputs in kernels/src/kernels.h: a group's linears written by one op


@dataclasses.dataclass(frozen=True)
class KernelRotation:
    """An online rotation ``x @ kron(A, B)`` in the op's layout (kernels/src/kernels.h).

    Attributes:
        block: b, the size of the inner factor (``rotation_block``); a = K / b.
        at: A^T zero-padded to ``[a16, a16]`` (a16 = a rounded up to 16), or None for A = I or Walsh.
        b: B zero-padded to ``[b16, b16]`` (b16 = b rounded up to 16), or None for B = I or Walsh.
        walsh: ``rotation_walsh``: bit 0 B, bit 1 A is the normalised Walsh-Hadamard matrix ``H_n / sqrt(n)``
            (Sylvester's construction; the op runs it as a fast transform and takes no matrix for it).
    """

    block: int
    at: np.ndarray | None
    b: np.ndarray | None
    walsh: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """What the op computes before quantizing, in float64 (no fp16 rounding): ``x [..., K]`` rotated."""
        K = x.shape[-1]
        a, b = K // self.block, self.block
        X = x.reshape(-1, a, b).astype(np.float64)
        if self.b is not None:
            X = X @ self.b[:b, :b]
        elif self.walsh & 1:
            X = X @ walsh_matrix(b)
        if self.at is not None:
            X = np.einsum("pi,rib->rpb", self.at[:a, :a], X)
        elif self.walsh & 2:
            X = np.einsum("pi,rib->rpb", walsh_matrix(a), X)
        return X.reshape(x.shape)


def kernel_rotation(groups: list[tuple[int, np.ndarray | None]], K: int) -> KernelRotation | None:
    """The op's form of the rotation ``kron(*groups)`` of a K-wide activation, or None when the op cannot run it
    (more than two groups, an inner size that is not a multiple of 8, a row too large for its shared memory).
    ``groups``: ``[(size, matrix or None)]`` as
    :class:`onnxqf.graph.edit.OnlineRotation` reads them."""
    if len(groups) == 1:
        (size, f), = groups
        groups = [(1, None), (size, f)]
    if len(groups) != 2 or groups[0][0] * groups[1][0] != K:
        return None
    (a, A), (b, B) = groups
    if A is not None:
        a, A, b, B = balance_factors(a, np.asarray(A, np.float64), b, B)
    a16, b16 = -(-a // 16) * 16, -(-b // 16) * 16
    if b % 8 or 6 * a16 * b16 > ROTATE_MAX_SMEM or (A is None and B is None):
        return None
    A = None if A is None else np.asarray(A, np.float64)
    B = None if B is None else np.asarray(B, np.float64)
    sa, sb = walsh_sign(A), walsh_sign(B)
    if A is not None and B is not None and (sa == -1 or (sa == 0 and sb == -1)):
        A, B, sa, sb = -A, -B, -sa, -sb  # kron(-A, -B) = kron(A, B): a Walsh factor found with the other sign
    walsh = (1 if sb == 1 else 0) | (2 if sa == 1 else 0)
    at = bp = None
    if A is not None and not walsh & 2:
        at = np.zeros((a16, a16))
        at[:a, :a] = A.T
    if B is not None and not walsh & 1:
        bp = np.zeros((b16, b16))
        bp[:b, :b] = B
    return KernelRotation(b, at, bp, walsh)


def kron_split(A: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A1, A2)`` with ``A = kron(A1, A2)``, A2 of size ``s``, both orthogonal when A is, or None when A is no
    such product (to 1e-9 of its norm). A Kronecker product is the rank-one case of A rearranged so that each row
    holds one block (Van Loan's rearrangement); its top singular pair gives the factors."""
    n = A.shape[0]
    if s <= 1 or s >= n or n % s:
        return None
    r = n // s
    R = A.reshape(r, s, r, s).transpose(0, 2, 1, 3).reshape(r * r, s * s)
    u, sv, vt = np.linalg.svd(R, full_matrices=False)
    if sv.size > 1 and sv[1] > 1e-9 * sv[0]:
        return None
    A1 = u[:, 0].reshape(r, r) * np.sqrt(r)  # orthogonal factors have Frobenius norms sqrt(r) and sqrt(s)
    A2 = vt[0].reshape(s, s) * (sv[0] / np.sqrt(r))
    if not np.allclose(np.kron(A1, A2), A, atol=1e-9 * max(1.0, np.abs(A).max())):
        return None
    return A1, A2


def balance_factors(a: int, A: np.ndarray, b: int, B: np.ndarray | None):
    """``kron(A, B)`` as ``kron(A1, kron(A2, B))`` with the split of A (:func:`kron_split`) that minimizes the op's
    work per token, ``2 a b (a + b)`` multiply-adds for sizes (a, b): an outer 256 of Sylvester type over an inner 16
    (K = 4096) becomes 64 x 64, half the work. Returns ``(a, A, b, B)`` (B None = the identity), unchanged when no
    split helps or fits (an inner size a multiple of 8, the op's shared memory)."""
    best = (a + b, a, A, b, B)
    for s in range(2, a):
        if a % s or a // s + b * s >= best[0] or (b * s) % 8:
            continue
        a1, b1 = a // s, b * s
        if 6 * (-(-a1 // 16) * 16) * (-(-b1 // 16) * 16) > ROTATE_MAX_SMEM:
            continue
        split = kron_split(A, s)
        if split is not None:
            A1, A2 = split
            best = (a1 + b1, a1, A1, b1, np.kron(A2, np.eye(b) if B is None else np.asarray(B, np.float64)))
    return best[1:]


@dataclasses.dataclass(frozen=True)
class SwiGlu:
    """``value = Mul(Mul(g, Sigmoid(g)), u)`` found in a graph: the two inputs and the three nodes (outer Mul first)."""

    g: ir.Value
    u: ir.Value
    nodes: tuple[ir.Node, ...]


def _is_op(node: ir.Node | None, op_type: str, arity: int) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") and \
        len(node.inputs) == arity and all(v is not None for v in node.inputs)


def swiglu_of(value: ir.Value) -> SwiGlu | None:
    """The SwiGLU product whose output is ``value`` (module docstring), or None. Rules: the outer node is a Mul of
    ``silu`` and u; ``silu`` is a Mul of g and ``Sigmoid(g)``, each read by nothing else (either operand order at
    each Mul); g and u are float16 and of one known shape (no broadcasting)."""
    outer = value.producer()
    if not _is_op(outer, "Mul", 2):
        return None
    for silu, u in (tuple(outer.inputs), tuple(reversed(outer.inputs))):
        inner = silu.producer()
        if not _is_op(inner, "Mul", 2) or len(list(silu.consumers())) != 1:
            continue
        for g, sig_v in (tuple(inner.inputs), tuple(reversed(inner.inputs))):
            sig = sig_v.producer()
            if not _is_op(sig, "Sigmoid", 1) or sig.inputs[0] is not g or len(list(sig_v.consumers())) != 1:
                continue
            dtypes = {v.type.dtype if v.type is not None else None for v in (g, u)}
            if dtypes != {ir.DataType.FLOAT16} or g.shape is None or u.shape is None or \
                    list(g.shape) != list(u.shape) or g is u:
                continue
            return SwiGlu(g, u, (outer, inner, sig))
    return None


#: SkipSimplifiedLayerNormalization's epsilon when the node has none (ONNX Runtime's default)
SKIP_NORM_EPSILON = 1e-12


@dataclasses.dataclass(frozen=True)
class SkipNorm:
    """``SkipSimplifiedLayerNormalization(x, skip, gamma)`` found in front of a group (:func:`skip_norm_of`): its
    inputs, epsilon, node, and its output 3 (``x + skip``) when something reads it."""

    x: ir.Value
    skip: ir.Value
    gamma: ir.Value
    epsilon: float
    node: ir.Node
    sum: ir.Value | None


def skip_norm_of(value: ir.Value, readers: set[int]) -> SkipNorm | None:
    """The SkipSimplifiedLayerNormalization whose output 0 is ``value``, when the op can take it over, or None.
    Rules: domain com.microsoft; inputs (x, skip, gamma) and no bias; x, skip float16 of one shape, gamma [K]; value
    read only by the nodes whose ids are ``readers`` and not a graph output; outputs 1 and 2 (mean, inverse
    deviation) read by nothing; K a multiple of 16."""
    node = value.producer()
    if node is None or node.op_type != "SkipSimplifiedLayerNormalization" or node.domain != "com.microsoft" or \
            node.outputs[0] is not value:
        return None
    ins = list(node.inputs)
    if len(ins) < 3 or any(v is None for v in ins[:3]) or any(v is not None for v in ins[3:]):
        return None
    x, skip, gamma = ins[:3]
    if any(v.type is None or v.type.dtype != ir.DataType.FLOAT16 for v in (x, skip, gamma)):
        return None
    if x.shape is None or skip.shape is None or list(x.shape) != list(skip.shape) or x is skip:
        return None
    K = x.shape[-1]
    if not isinstance(K, int) or K % 16 or gamma.shape is None or list(gamma.shape) != [K]:
        return None
    if value.is_graph_output() or {id(n) for n in value.consumers()} - readers:
        return None
    outs = list(node.outputs)
    if any(o is not None and (o.is_graph_output() or list(o.consumers())) for o in outs[1:3]):
        return None
    total = outs[3] if len(outs) > 3 else None
    if total is not None and not (total.is_graph_output() or list(total.consumers())):
        total = None
    eps = node.attributes.get("epsilon")
    return SkipNorm(x, skip, gamma, float(eps.as_float()) if eps is not None else SKIP_NORM_EPSILON, node, total)


def emit_w8a8_kernel(graph: ir.Graph, x: ir.Value, q_int8_KN: np.ndarray, scale: np.ndarray, base_name: str,
                     tape: ir_tape.Tape | None = None, rotation: KernelRotation | None = None,
                     output_sizes: list[int] | None = None, glu_up: ir.Value | None = None,
                     norm: SkipNorm | None = None, asymmetric: bool = False):
    """The ``onnxqf.W8A8Linear`` node (on ``tape``, a new one if None, not inserted) computing
    ``x @ (q_int8_KN * scale)`` with per-token int8 activations: ``q_int8_KN`` int8 ``[K, N]`` (MatMul's layout),
    ``scale`` the per-output-channel weight scale ``[N]``; ``rotation``: x is rotated first, inside the op.
    Returns the float16 output value; with ``output_sizes`` (several parts adding up to N, at most
    :data:`MAX_OUTPUTS`) the list of one output per part, the N channels cut in that order (no Split node); with
    ``glu_up`` the op's input is ``silu(x) * glu_up`` (SwiGLU, :func:`swiglu_of`). With ``norm`` (x is then
    ignored: :func:`skip_norm_of`) the op reads ``norm.x + norm.skip`` and normalizes it; it returns the list of
    outputs, ``norm.x + norm.skip`` last when ``norm.sum`` is read. ``asymmetric``: the asymmetric codes (module
    docstring)."""
    if q_int8_KN.dtype != np.int8 or q_int8_KN.ndim != 2 or scale.shape != (q_int8_KN.shape[1],):
        raise OnnxqfError(f"{base_name}: W8A8Linear needs int8 [K, N] weights and N scales")
    tape = tape if tape is not None else ir_tape.Tape(graph)
    wq = edit.add_initializer(graph, f"{base_name}.weight_int8_nk", transpose_copy(q_int8_KN))
    # the activation's 1/127 folded into the symmetric codes' scale; the asymmetric codes' step s is the real one
    ws = edit.add_initializer(graph, f"{base_name}.weight_scale",
                              (np.asarray(scale, np.float64) / (1.0 if asymmetric else 127.0)).astype(np.float32))
    inputs, attributes = [x, wq, ws], {}
    if rotation is not None:
        ra = rb = None
        if rotation.at is not None:
            ra = edit.add_initializer(graph, f"{base_name}.rotation_at", rotation.at, ir.DataType.FLOAT16)
        if rotation.b is not None:
            rb = edit.add_initializer(graph, f"{base_name}.rotation_b", rotation.b, ir.DataType.FLOAT16)
        inputs += [None, ra, rb]
        attributes["rotation_block"] = int(rotation.block)
        if rotation.walsh:
            attributes["rotation_walsh"] = int(rotation.walsh)
    if glu_up is not None:
        inputs += [None] * (6 - len(inputs)) + [glu_up]  # U is the op's input 6
        attributes["input_glu"] = 1
    if norm is not None:
        if rotation is not None or glu_up is not None:
            raise OnnxqfError(f"{base_name}: W8A8Linear's skip_norm does not combine with a rotation or input_glu")
        inputs[0] = norm.x
        inputs += [None] * (7 - len(inputs)) + [norm.skip, norm.gamma]  # Skip, Gamma: the op's inputs 7, 8
        attributes["skip_norm"] = 2 if norm.sum is not None else 1
        attributes["epsilon"] = float(norm.epsilon)
    if asymmetric:
        colsum = q_int8_KN.astype(np.int64).sum(axis=0).astype(np.float32)  # exact: |sum| < 2^24 for K < 132k
        inputs += [None] * (9 - len(inputs)) + [edit.add_initializer(graph, f"{base_name}.weight_colsum", colsum)]
        attributes["asymmetric"] = 1
    while inputs[-1] is None:  # no trailing empty inputs (a Walsh factor takes none)
        inputs.pop()
    sizes = list(output_sizes) if output_sizes is not None and len(output_sizes) > 1 else []
    if sizes or (norm is not None and norm.sum is not None):
        if sizes and (len(sizes) > MAX_OUTPUTS or sum(sizes) != q_int8_KN.shape[1] or min(sizes) < 1):
            raise OnnxqfError(f"{base_name}: W8A8Linear takes 2..{MAX_OUTPUTS} positive output sizes adding up to N")
        if sizes:
            attributes["output_sizes"] = [int(n) for n in sizes]
        count = max(len(sizes), 1) + (1 if norm is not None and norm.sum is not None else 0)
        ys = tape.op_multi_out(OP, inputs, attributes=attributes, domain=DOMAIN, num_outputs=count,
                               name=f"{base_name}/w8a8_linear")
        for y in ys:
            y.type = ir.TensorType(ir.DataType.FLOAT16)
        return list(ys)
    y = tape.op(OP, inputs, attributes=attributes or None, domain=DOMAIN, name=f"{base_name}/w8a8_linear")
    y.type = ir.TensorType(ir.DataType.FLOAT16)
    return [y] if norm is not None else y


@register
@dataclasses.dataclass
class OnnxqfCudaW8A8(W8A8Lowering):
    name = "onnxqf-cuda"
    providers = ("cuda",)
    summary = ("per-token int8 x int8 in one fused onnxqf.W8A8Linear node per activation (onnxqf's CUDA kernels: "
               "H100/H200, float16 models; sessions load kernels/build/libonnxqf_kernels.so)")
    domains: ClassVar[dict[str, int]] = {DOMAIN: 1}
    activations: ClassVar[tuple[str, ...]] = ("token", "asym")
    #: move online rotations into the op where it can run them (:func:`kernel_rotation`)
    fuse_rotations: bool = True
    #: compute SwiGLU's product inside the op where it is the group's activation (:func:`swiglu_of`)
    fuse_glu: bool = True
    #: take a SkipSimplifiedLayerNormalization in front of the group into the op (:func:`skip_norm_of`)
    fuse_norm: bool = True
    #: ``int8-token-asym``'s asymmetric per-token codes (``--act-quant asym``) instead of the symmetric ones; off by
    #: default: 2-6 % slower per linear on an H100, their accuracy on the GPU not yet measured (docs/benchmarks.md g18)
    asymmetric: bool = False

    def emit(self, graph: ir.Graph, group: LinearGroup, weights) -> None:
        if group.dtype != ir.DataType.FLOAT16:
            raise OnnxqfError(f"--lowering {self.name} takes float16 models (onnxqf's CUDA kernels read float16 "
                              f"activations); this one is {group.dtype.name.lower()}: export with --dtype float16")
        q = np.concatenate([w[0] for w in weights], axis=1)
        scale = np.concatenate([w[1] for w in weights])
        tape = ir_tape.Tape(graph)
        x, block, rotation = group.x, None, None
        if self.fuse_rotations:
            block = edit.online_rotation_of(graph, group.x)
            readers = {id(lin.node) for lin in group.linears}
            if block is not None and block.private() and {id(n) for n in group.x.consumers()} == readers:
                rotation = kernel_rotation(block.groups, q.shape[0])
            if rotation is not None:
                x = block.input
        # SwiGLU's product read only by this group (or by the rotation the op takes over): computed inside the op
        glu = swiglu_of(x) if self.fuse_glu else None
        if glu is not None:
            readers = {id(lin.node) for lin in group.linears} | {id(n) for n in (block.nodes if rotation else [])}
            if not {id(n) for n in x.consumers()} <= readers or x.is_graph_output():
                glu = None
        x_in, up = (glu.g, glu.u) if glu is not None else (x, None)
        sizes = [w[0].shape[1] for w in weights]
        norm = None
        if self.fuse_norm and rotation is None and glu is None and len(sizes) <= MAX_OUTPUTS:
            norm = skip_norm_of(x, {id(lin.node) for lin in group.linears})
        total = None
        if len(sizes) <= MAX_OUTPUTS:  # one output per linear, written by the op itself
            y = emit_w8a8_kernel(graph, x_in, q, scale, group.base, tape, rotation, output_sizes=sizes, glu_up=up,
                                 norm=norm, asymmetric=self.asymmetric)
            outs = y if isinstance(y, list) else [y]
            if norm is not None and norm.sum is not None:
                outs, total = outs[:-1], outs[-1]
        else:  # (no such group in the families served: more parts than the op's outputs)
            y = emit_w8a8_kernel(graph, x_in, q, scale, group.base, tape, rotation, glu_up=up,
                                 asymmetric=self.asymmetric)
            split = edit.add_initializer(graph, f"{group.base}/split_sizes", np.array(sizes, np.int64))
            outs = tape.op_multi_out("Split", [y, split], {"axis": -1}, num_outputs=len(weights),
                                     name=f"{group.base}/split")
        # (the op takes the norm's inputs: it goes where the norm was, before anything reads the sum)
        graph.insert_before(norm.node if norm is not None else group.first, tape.nodes)
        replace_outputs(graph, group.linears, outs)
        if rotation is not None:
            block.remove(graph)
        if glu is not None:
            graph.remove(list(glu.nodes), safe=True)
        if norm is not None:
            if total is not None:
                take_over(norm.sum, total, ".unfused")
            graph.remove(norm.node, safe=True)

    def describe(self) -> str:
        return f"{self.name}:asymmetric=true" if self.asymmetric else self.name

    def node_issue(self, node: ir.Node, provider: str) -> str | None:
        if node.domain != DOMAIN:
            return None
        if provider != "cuda":
            return (f"{node.op_type} '{node.name}': onnxqf's CUDA kernels have no {provider} kernel "
                    "(rewrite with another --lowering for this provider)")
        return None
