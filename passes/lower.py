"""lower: rewrite every planned MatMul / Gemm into the ops of a target runtime.

Targets:
 - ``ort``: ``com.microsoft::MatMulNBits`` per factor (onnxruntime's fast MLAS / CUDA kernels).
 - ``std``: standard ONNX only: ``DequantizeLinear(axis=0, block_size)`` over int4/uint4 or
   int8/uint8 initializers, then MatMul (opset 21; older models are converted first).
 - ``lrq``: lrqgraph's native custom ops (any code width 2..8, float16 or float32 scales with
   float32 activations; lrqgraph.runtime.session registers the library): ``lrq::QLowRankMatMul``
   for L·R and Q + L·R in one node, ``lrq::QMatMul`` for a dense factor, ``lrq::KashinMatMul``
   for codebook forms (Kashin with Hadamard transforms, k-means).
Cases, per node multiplying X by a planned weight W ≈ Σ_chains Π factors:
 1. Each chain becomes a MatMul chain from X; several chains are summed with Add (lrq: L·R and
    Q + L·R become one fused node).
 2. Gemm: alpha becomes a Mul after the sum; beta·C becomes the MatMulNBits bias (constant 1-D C,
    single chain, alpha = 1) or an Add.
 3. The last node writes the original output tensor, so names and graph outputs are unchanged.
Factor initializers are created once per weight, so shared weights stay shared.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import numpy_helper, version_converter

from lrqgraph import __version__
from lrqgraph.errors import LrqError
from lrqgraph.model import IR_VERSION_INT4, ModelState
from lrqgraph.numerics import QuantizedTensor, pack_bits
from lrqgraph.numerics.kashin import KashinTensor
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.runtime.native_ops import library_path

from .discover import Layer, constant_values

log = logging.getLogger(__name__)

STD_OPSET = 21            # DequantizeLinear with block_size and int4 types
ORT_BITS = (2, 4, 8)      # MatMulNBits code widths onnxruntime's CPU kernel accepts
TARGETS = ("ort", "std", "lrq")


def _const(name: str, proto: onnx.TensorProto) -> gs.Constant:
    proto.name = name
    return gs.Constant(name, values=LazyValues(proto))


def _stored_nbytes(const: gs.Constant) -> int:
    # Read the proto we built; ``const.values`` would unpack int4 data into a numpy array.
    return len(const._values.tensor.raw_data)


def _array(name: str, array: np.ndarray) -> gs.Constant:
    return _const(name, numpy_helper.from_array(np.ascontiguousarray(array), name))


def _packed_tensor(name: str, values: np.ndarray, data_type: int) -> gs.Constant:
    """A 4-bit tensor: values (< 16, any shape) packed two per byte in row-major order."""
    flat = values.reshape(-1).astype(np.uint8) & 0xF
    proto = onnx.TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    proto.raw_data = pack_bits(flat[None, :], 4).tobytes()  # an odd count leaves a zero high nibble
    return _const(name, proto)


class Emitter:
    """Creates the factor initializers of one weight once, and the nodes for each consumer."""

    def __init__(self, graph: gs.Graph, target: str, prefix: str, dtype: np.dtype,
                 accuracy_level: int | None = None, io_dtype: np.dtype | None = None):
        self.graph, self.target, self.prefix, self.dtype = graph, target, prefix, np.dtype(dtype)
        self.io_dtype = np.dtype(io_dtype or dtype)  # the layer's own activations
        # lrq: int8 activations unless told otherwise (its kernels are built for them)
        self.accuracy_level = 4 if accuracy_level is None and target == "lrq" else accuracy_level
        self._factors: dict[tuple[int, int], list[gs.Tensor]] = {}
        self.stored_bytes = 0

    def factor(self, key: tuple[int, int], q: QuantizedTensor) -> list[gs.Tensor]:
        if key not in self._factors:
            name = f"{self.prefix}.lrq{key[0]}_{key[1]}"
            make = {"ort": self._ort_factor, "std": self._std_factor, "lrq": self._lrq_factor}[self.target]
            tensors = make(name, q)
            self.stored_bytes += sum(_stored_nbytes(t) for t in tensors)
            self._factors[key] = tensors
        return self._factors[key]

    def _ort_factor(self, name: str, q: QuantizedTensor) -> list[gs.Tensor]:
        packed, _, _ = q.packed_columns()  # MatMulNBits stores row n = column n of W, blocks along K
        tensors = [_array(f"{name}.q", packed),
                   _array(f"{name}.scales", q.scales.T.astype(self.dtype).reshape(-1))]
        if q.zero_points is not None:
            tensors.append(_array(f"{name}.zp", pack_bits(q.zero_points.T, q.bits)))
        return tensors

    def _lrq_factor(self, name: str, q: QuantizedTensor) -> list[gs.Tensor]:
        codes, scales, zero_points = q.packed_columns()
        tensors = [_array(f"{name}.q", codes), _array(f"{name}.scales", scales)]
        if zero_points is not None:
            tensors.append(_array(f"{name}.zp", zero_points))
        return tensors

    def _std_factor(self, name: str, q: QuantizedTensor) -> list[gs.Tensor]:
        half = 1 << (q.bits - 1)
        scales = _array(f"{name}.scales", q.scales.astype(self.dtype))
        if q.bits <= 4:
            if q.symmetric:  # signed two's-complement nibbles, implicit zero point 0
                return [_packed_tensor(f"{name}.q", q.codes.astype(np.int16) - half, onnx.TensorProto.INT4), scales]
            return [_packed_tensor(f"{name}.q", q.codes, onnx.TensorProto.UINT4), scales,
                    _packed_tensor(f"{name}.zp", q.zero_points, onnx.TensorProto.UINT4)]
        if q.symmetric:
            return [_array(f"{name}.q", (q.codes.astype(np.int16) - half).astype(np.int8)), scales]
        return [_array(f"{name}.q", q.codes), scales, _array(f"{name}.zp", q.zero_points)]

    def matmul(self, x: gs.Tensor, q: QuantizedTensor, key: tuple[int, int], tag: str,
               bias: np.ndarray | None = None) -> gs.Variable:
        """Emit X·dequant(q) (+ bias); returns the output variable."""
        out = gs.Variable(f"{tag}/lrq{key[0]}_{key[1]}", dtype=self.dtype)
        factors = self.factor(key, q)
        if self.target == "lrq":
            inputs = [x, *factors[:2], factors[2] if len(factors) > 2 else gs.Variable.empty()]
            if bias is not None:
                inputs.append(_array(f"{tag}.bias", bias.astype(np.float32)))
            k, n = q.shape
            attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size,
                     "accuracy_level": self.accuracy_level}
            self.graph.nodes.append(gs.Node("QMatMul", f"{tag}/QMatMul{key[0]}_{key[1]}", attrs, inputs, [out],
                                            domain="lrq"))
            return out
        if self.target == "ort":
            inputs = [x, *factors[:2], factors[2] if len(factors) > 2 else gs.Variable.empty()]
            if bias is not None:
                inputs += [gs.Variable.empty(), _array(f"{tag}.bias", bias.astype(self.dtype))]
            k, n = q.shape
            level = self.accuracy_level
            if level is None:  # 8-bit codes only have a fast CPU path with int8 activations
                level = 4 if q.bits == 8 else 0
            attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size, "accuracy_level": level}
            self.graph.nodes.append(gs.Node("MatMulNBits", f"{tag}/MatMulNBits{key[0]}_{key[1]}", attrs,
                                            inputs, [out], domain="com.microsoft"))
            return out
        deq = gs.Variable(f"{tag}/lrq{key[0]}_{key[1]}_w", dtype=self.dtype)
        attrs = {"axis": 0, "block_size": q.block_size}
        self.graph.nodes.append(gs.Node("DequantizeLinear", f"{tag}/DequantizeLinear{key[0]}_{key[1]}",
                                        attrs, list(factors), [deq]))
        self.graph.nodes.append(gs.Node("MatMul", f"{tag}/MatMul{key[0]}_{key[1]}", {}, [x, deq], [out]))
        return out

    def fused(self, x: gs.Tensor, form: tuple, tag: str, bias: np.ndarray | None) -> gs.Variable:
        """One lrq::QLowRankMatMul node for X·L·R (+ X·Q) (+ bias)."""
        (dense, dense_key), (left, left_key), (right, right_key) = form
        k, rank, n = left.shape[0], left.shape[1], right.shape[1]
        attrs = {"K": k, "N": n, "rank": rank, "accuracy_level": self.accuracy_level}
        inputs = [x]
        for prefix, q, key in (("l", left, left_key), ("r", right, right_key), ("q", dense, dense_key)):
            if q is None:
                inputs += [gs.Variable.empty()] * 3
                continue
            factors = self.factor(key, q)
            inputs += [*factors[:2], factors[2] if len(factors) > 2 else gs.Variable.empty()]
            attrs[f"{prefix}_bits"], attrs[f"{prefix}_block_size"] = q.bits, q.block_size
        if bias is not None:
            inputs.append(_array(f"{tag}.bias", bias.astype(np.float32)))
        out = gs.Variable(f"{tag}/lrq_lowrank", dtype=self.dtype)
        self.graph.nodes.append(gs.Node("QLowRankMatMul", f"{tag}/QLowRankMatMul", attrs, inputs, [out],
                                        domain="lrq"))
        return out

    def codebook(self, x: gs.Tensor, t: "KashinTensor | QuantizedTensor", tag: str,
                 bias: np.ndarray | None) -> gs.Variable:
        """One lrq::KashinMatMul node: X·(U + F1·V·F2ᵀ) for Kashin, X·U for a k-means codebook."""
        kashin = isinstance(t, KashinTensor)
        codes = t.pairs if kashin else t
        k, n = codes.shape
        if (0, 0) not in self._factors:
            name = f"{self.prefix}.lrq0_0"
            book = (codes.codebook * t.norm if kashin else codes.codebook.reshape(-1, 1)).astype(np.float32)
            tensors = [_array(f"{name}.codes", pack_bits(codes.codes.T, codes.bits)), _array(f"{name}.codebook", book)]
            for axis, label in ((t.transform.rows, "row"), (t.transform.cols, "col")) if kashin else ():
                tensors.append(_array(f"{name}.{label}_signs", axis.signs.astype(np.float32)))
                tensors.append(_array(f"{name}.{label}_small", axis.small) if axis.small is not None
                               else gs.Variable.empty())
            self.stored_bytes += sum(_stored_nbytes(c) for c in tensors if isinstance(c, gs.Constant))
            self._factors[(0, 0)] = tensors
        inputs = [x, *self._factors[(0, 0)]]
        inputs += [gs.Variable.empty()] * (7 - len(inputs))
        if bias is not None:
            inputs.append(_array(f"{tag}.bias", bias.astype(np.float32)))
        out = gs.Variable(f"{tag}/lrq_codebook", dtype=self.dtype)
        self.graph.nodes.append(gs.Node("KashinMatMul", f"{tag}/KashinMatMul", {"K": k, "N": n, "bits": codes.bits},
                                        inputs, [out], domain="lrq"))
        return out

    def op(self, op: str, tag: str, inputs: list[gs.Tensor], dtype: np.dtype | None = None,
           attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(f"{tag}/{op}_out", dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, f"{tag}/{op}", attrs or {}, inputs, [out]))
        return out

    def cast(self, x: gs.Tensor, dtype: np.dtype, tag: str) -> gs.Variable:
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return self.op("Cast", tag, [x], dtype=np.dtype(dtype), attrs={"to": to})


def codebook_form(rep):
    """The one KashinTensor or codebook tensor W is, else None."""
    if len(rep.chains) == 1 and len(rep.chains[0]) == 1:
        t = rep.chains[0][0]
        if isinstance(t, KashinTensor) or (t.codebook is not None and t.codebook.ndim == 1 and t.scales is None):
            return t
    return None


def check_lowerable(layer: Layer, rep, target: str) -> None:
    # the ort and std kernels take uniform grids blocked down K; codebooks need the native ops
    t = codebook_form(rep)
    if target == "lrq" and t is not None:
        if isinstance(t, KashinTensor) and t.transform.kind != "hadamard":
            raise LrqError(f"layer '{layer.name}': lrq::KashinMatMul runs Hadamard transforms, this weight "
                           f"used '{t.transform.kind}'; use --transform hadamard")
        return
    if not all(isinstance(q, QuantizedTensor) and q.codebook is None and q.axis == 0
               for chain in rep.chains for q in chain):
        raise LrqError(f"layer '{layer.name}': method {rep.method} has codebooks, which only the native ops run; "
                       f"use --lowering lrq, or choose rtn, gptq, svd, lplr or qlr")


def check_ort_compatible(layer: Layer, rep) -> None:
    for chain in rep.chains:
        for q in chain:
            if q.bits not in ORT_BITS:
                raise LrqError(f"layer '{layer.name}': {q.bits}-bit codes have no MatMulNBits kernel "
                               f"(bits {', '.join(map(str, ORT_BITS))}); use --lowering std or --bits 4")
            if q.block_size & (q.block_size - 1) or not 16 <= q.block_size <= 256:
                raise LrqError(f"layer '{layer.name}': MatMulNBits needs a power-of-two block size in "
                               f"16..256, got {q.block_size}; use --block-size 32 or --lowering std")


def fused_form(rep) -> tuple | None:
    """((Q, key) or (None, None), (L, key), (R, key)) when W is L·R or Q + L·R, else None."""
    singles = [(c[0], (i, 0)) for i, c in enumerate(rep.chains) if len(c) == 1]
    pairs = [(c, i) for i, c in enumerate(rep.chains) if len(c) == 2]
    if len(pairs) != 1 or len(singles) > 1 or len(singles) + len(pairs) != len(rep.chains):
        return None
    (left, right), i = pairs[0]
    return (singles[0] if singles else (None, None)), (left, (i, 0)), (right, (i, 1))


def _gemm_bias(node: gs.Node) -> tuple[gs.Tensor | None, np.ndarray | None, float]:
    """(C tensor, constant C values or None, beta) of a Gemm; (None, None, 1) for MatMul."""
    if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
        return None, None, 1.0
    c = node.inputs[2]
    return c, constant_values(c), float(node.attrs.get("beta", 1.0))


def rewrite_node(em: Emitter, node: gs.Node, rep, tag: str) -> None:
    x, y = node.inputs[0], node.outputs[0]
    c, c_values, beta = _gemm_bias(node)
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    vector_bias = None
    form = fused_form(rep) if em.target == "lrq" else None
    book = codebook_form(rep) if em.target == "lrq" else None
    # a [N] or [1, N] constant C rides in the last node's bias input; any other C gets an Add
    if c_values is not None and c_values.size == rep.shape[1] and c_values.shape[-1:] == (rep.shape[1],) \
            and alpha == 1.0 and (len(rep.chains) == 1 or form or book is not None) and em.target in ("ort", "lrq"):
        vector_bias = (beta * c_values.astype(np.float32)).reshape(-1)
    node.inputs.clear()
    node.outputs.clear()
    if em.dtype != em.io_dtype:
        x = em.cast(x, em.dtype, f"{tag}/in")
    sums = [em.fused(x, form, tag, vector_bias)] if form else []
    if book is not None:
        sums = [em.codebook(x, book, tag, vector_bias)]
    for ci, chain in enumerate(rep.chains if not sums else ()):
        h = x
        for fi, q in enumerate(chain):
            last = fi == len(chain) - 1
            h = em.matmul(h, q, (ci, fi), tag, bias=vector_bias if (last and ci == 0) else None)
        sums.append(h)
    h = sums[0]
    for other in sums[1:]:
        h = em.op("Add", tag, [h, other])
    if em.dtype != em.io_dtype:
        h = em.cast(h, em.io_dtype, f"{tag}/out")
    io = em.io_dtype
    if alpha != 1.0:
        h = em.op("Mul", f"{tag}/alpha", [h, _array(f"{tag}.alpha", np.array(alpha, io))], dtype=io)
    if c is not None and vector_bias is None:
        if beta != 1.0:
            c = em.op("Mul", f"{tag}/beta", [c, _array(f"{tag}.beta", np.array(beta, io))], dtype=io)
        h = em.op("Add", f"{tag}/bias", [h, c], dtype=io)
    producer = h.inputs[0]
    producer.outputs.clear()
    producer.outputs.append(y)


@register_pass
class Lower(Pass):
    """Rewrite planned layers for a target: ``lower(ort)``, ``lower(std)`` or ``lower(lrq)``.

    ``accuracy_level`` (default: the config's) sets the activations' precision for every node: 0
    float, 4 int8 per block. Unset, ort uses 0 for 2/4-bit codes and 4 for 8-bit codes (their only
    fast onnxruntime CPU kernel quantizes activations), lrq uses 4.
    """

    name = "lower"
    positional = ("target",)

    def run(self, ctx: Context) -> PassResult:
        target = self.params.get("target", ctx.config.lowering)
        if target not in TARGETS:
            raise LrqError(f"unknown lowering target '{target}'; choose one of {', '.join(TARGETS)}")
        if not ctx.plans:
            return PassResult(modified=False)
        if target == "std":
            _upgrade_opset(ctx)
        graph = ctx.model.graph
        rewritten = 0
        warned_2bit = False
        for layer in ctx.analysis("layers"):
            rep = ctx.plans.get(layer.weight) if layer.rewrite else None
            if rep is None:
                continue
            check_lowerable(layer, rep, target)
            if target == "lrq":
                library_path()  # a clear error now if the native ops are missing
                if np.dtype(layer.dtype) != np.float32:
                    raise LrqError(f"layer '{layer.name}': the lrq lowering takes float32 layers, this one is "
                                   f"{layer.dtype}; use --lowering ort")
            if target == "ort":
                check_ort_compatible(layer, rep)
                if any(q.bits == 2 for chain in rep.chains for q in chain) and not warned_2bit:
                    warned_2bit = True
                    log.warning("2-bit MatMulNBits has no fast onnxruntime CPU kernel at float accuracy: it "
                                "dequantizes the weight on every call; --lowering std runs 2-bit codes "
                                "(stored as int4) through the fast 4-bit kernel")
            # float16 scales of a float32 layer: MatMulNBits and DequantizeLinear then compute in
            # float16; the lrq op takes either scale type with float32 activations
            compute = layer.dtype if target == "lrq" else rep.chains[0][0].scales.dtype
            level = self.params.get("accuracy_level", ctx.config.accuracy_level)
            em = Emitter(graph, target, layer.weight, compute, level,
                         io_dtype=np.dtype(layer.dtype))
            for node in layer.nodes:
                rewrite_node(em, node, rep, node.name or layer.name)
            replaced = {id(node) for node in layer.nodes}
            graph.nodes = [n for n in graph.nodes if id(n) not in replaced]
            entry = ctx.report["layers"].setdefault(layer.name, {"name": layer.name})
            entry["stored_bytes"] = em.stored_bytes
            entry["stored_bpw"] = round(em.stored_bytes * 8 / layer.params, 4)
            rewritten += 1
        graph.toposort()  # new nodes were appended at the end
        if target == "std":
            ctx.model.min_ir_version = max(ctx.model.min_ir_version, IR_VERSION_INT4)
        ctx.model.set_metadata("lrqgraph.version", __version__)
        ctx.model.set_metadata("lrqgraph.lowering", target)
        ctx.plans.clear()
        log.info("lower(%s): rewrote %d layers", target, rewritten)
        return PassResult(modified=True)


def _upgrade_opset(ctx: Context) -> None:
    """Blocked DequantizeLinear needs opset 21: convert older models first, keeping the plans."""
    if ctx.model.opset >= STD_OPSET:
        return
    old = ctx.model.opset
    try:
        converted = version_converter.convert_version(ctx.model.to_onnx(), STD_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise LrqError(f"cannot convert the model from opset {old} to {STD_OPSET} for the std lowering "
                       f"({str(exc).splitlines()[0]}); use --lowering ort") from None
    state = ModelState(converted)
    state.shell, state.min_ir_version = ctx.model.shell, ctx.model.min_ir_version
    ctx.model = state
    ctx.invalidate(None)
    log.info("lower(std): converted opset %d -> %d", old, STD_OPSET)
