"""relower: turn lrqgraph's custom-op nodes back into ops every onnxruntime has.

``lrqgraph lower MODEL --to ort|std`` runs it on a model written with ``--lowering lrq``:
 1. each ``lrq::QMatMul`` / ``lrq::QLowRankMatMul`` node is read back (inputs placed by
    runtime/op_schema.py) into its quantized factors (the same codes, scales and zero points,
    nothing requantized) and emitted by the ``lower`` pass's rules as MatMulNBits chains (ort) or
    DequantizeLinear + MatMul (std), bias included;
 2. ``lrq::KashinMatMul`` (Kashin and k-means codebooks) has no standard-op equivalent of its size:
    the whole conversion is refused, naming the node, before anything is changed.
"""
from __future__ import annotations

import logging
import numpy as np
import onnx_graphsurgeon as gs

from lrqgraph.errors import LrqError
from lrqgraph.graph import constant_values
from lrqgraph.model import IR_VERSION_INT4
from lrqgraph.numerics import QuantizedTensor, Representation, unpack_bits
from lrqgraph.numerics.rotation import Rotation
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.runtime.op_schema import DOMAIN, OPS

from .lower import Emitter, upgrade_opset, check_lowerable, rewrite_node

log = logging.getLogger(__name__)
TARGETS = ("ort", "std")


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    return node.inputs[index]


def _constant(node: gs.Node, index: int, what: str) -> np.ndarray:
    tensor = _input(node, index)
    values = constant_values(tensor) if tensor is not None else None
    if values is None:
        raise LrqError(f"node '{node.name}' ({node.op}): its {what} is not an initializer; only models written "
                       f"by lrqgraph's lrq lowering can be converted")
    return np.asarray(values)


def read_factor(node: gs.Node, prefix: str, k: int, n: int, bits: int, block: int, what: str) -> QuantizedTensor:
    """The factor held by inputs <prefix>codes [N, blocks, blob], <prefix>scales, <prefix>zero_points."""
    first = OPS[node.op].index(f"{prefix}codes")
    blocks = -(-k // block)
    packed = _constant(node, first, f"{what} codes").reshape(n * blocks, -1)
    codes = unpack_bits(packed, bits, block).reshape(n, blocks * block)[:, :k].T
    scales = _constant(node, first + 1, f"{what} scales").reshape(n, blocks).T
    zero_points = None
    if _input(node, first + 2) is not None:
        zero_points = np.ascontiguousarray(_constant(node, first + 2, f"{what} zero points").reshape(n, blocks).T)
    return QuantizedTensor(codes=np.ascontiguousarray(codes), scales=np.ascontiguousarray(scales),
                           zero_points=zero_points, bits=bits, block_size=block)


def read_rotation(node: gs.Node, k: int) -> Rotation | None:
    """The input rotation of an lrq node: drawn again from its seed, checked against its signs."""
    index = OPS[node.op].index("rotation_signs")
    if _input(node, index) is None:
        return None
    if "rotation_seed" not in node.attrs:
        raise LrqError(f"node '{node.name}' ({node.op}): a rotation without its rotation_seed; only models written "
                       f"by lrqgraph's lrq lowering can be converted")
    rotation = Rotation(k, int(node.attrs["rotation_seed"]))
    if not np.array_equal(_constant(node, index, "rotation signs").astype(np.float32), rotation.axis.signs):
        raise LrqError(f"node '{node.name}' ({node.op}): its rotation_signs are not those of its rotation_seed")
    return rotation


def read_node(node: gs.Node) -> tuple[Representation, gs.Tensor | None]:
    """(W as factors, bias tensor or None) of an lrq node."""
    a = node.attrs
    try:
        if node.op == "QMatMul":
            q = read_factor(node, "B_", a["K"], a["N"], a["bits"], a["block_size"], "B")
            return (Representation(((q,),), "lrq", rotation=read_rotation(node, a["K"])),
                    _input(node, OPS[node.op].index("bias")))
        if node.op == "QLowRankMatMul":
            left = read_factor(node, "L_", a["K"], a["rank"], a["l_bits"], a["l_block_size"], "L")
            right = read_factor(node, "R_", a["rank"], a["N"], a["r_bits"], a["r_block_size"], "R")
            chains = [(left, right)]
            if _input(node, OPS[node.op].index("Q_codes")) is not None:
                chains.insert(0, (read_factor(node, "Q_", a["K"], a["N"], a["q_bits"], a["q_block_size"], "Q"),))
            return (Representation(tuple(chains), "lrq", rank=a["rank"], rotation=read_rotation(node, a["K"])),
                    _input(node, OPS[node.op].index("bias")))
    except KeyError as exc:
        raise LrqError(f"node '{node.name}' ({node.op}): missing attribute {exc}") from None
    raise LrqError(f"node '{node.name}': lrq::{node.op} (a codebook weight) has no conversion to standard ops; "
                   f"keep --lowering lrq for it, or re-run lrqgraph optimize with a uniform-grid method "
                   f"(rtn, gptq, svd, lplr, qlr)")


@register_pass
class Relower(Pass):
    """Convert lrq custom-op nodes to ``relower(ort)`` or ``relower(std)``."""

    name = "relower"
    positional = ("target",)

    def validate(self) -> None:
        if self.params.get("target", "ort") not in TARGETS:
            raise LrqError(f"cannot lower lrq ops to '{self.params['target']}'; choose one of {', '.join(TARGETS)}")

    def run(self, ctx: Context) -> PassResult:
        target = self.params.get("target", "ort")
        nodes = [node for node in ctx.model.graph.nodes if node.domain == DOMAIN]
        if not nodes:
            return PassResult(modified=False)
        if target == "std":
            upgrade_opset(ctx)
            nodes = [node for node in ctx.model.graph.nodes if node.domain == DOMAIN]
        graph = ctx.model.graph
        read = [(node, *read_node(node)) for node in nodes]  # every refusal before the first change
        for node, rep, _ in read:
            check_lowerable(node.name, rep, target, "float32")
        for node, rep, bias in read:
            # lrq ops take float32 layers (check_lowerable): the rebuilt nodes compute in float32,
            # float16 scales stay stored as float16 and are cast when the session loads, as lower does
            em = Emitter(ctx.model, target, node.name, np.float32, self.params.get("accuracy_level"))
            # rewrite_node reads a MatMul (or a Gemm with its bias as C): present the node as one
            node.op, node.domain, node.attrs = ("Gemm" if bias is not None else "MatMul"), "", {}
            x = node.inputs[0]
            node.inputs.clear()  # gs' synchronized list: clear and extend keep both sides' links
            node.inputs.extend([x, gs.Variable.empty()] + ([bias] if bias is not None else []))
            rewrite_node(em, node, rep, node.name)
        graph.nodes = [n for n in graph.nodes if n.outputs]
        graph.import_domains = [d for d in graph.import_domains or [] if d.domain != DOMAIN] or None
        graph.toposort()
        if target == "std":
            ctx.model.min_ir_version = max(ctx.model.min_ir_version, IR_VERSION_INT4)
        ctx.model.set_metadata("lrqgraph.lowering", target)
        log.info("relower(%s): converted %d lrq nodes", target, len(nodes))
        return PassResult(modified=True)
