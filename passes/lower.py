"""lower: rewrite every planned MatMul / Gemm into the ops of a target runtime.

Targets:
 - ``ort``: ``com.microsoft::MatMulNBits`` per factor (onnxruntime's fast MLAS / CUDA kernels).
 - ``std``: standard ONNX only: ``DequantizeLinear(axis=0, block_size)`` over int4/uint4 or
   int8/uint8 initializers, then MatMul (opset 21; older models are converted first).
 - ``lrq``: lrqgraph's native custom ops (runtime/op_schema.py; any code width 2..8, float16 or
   float32 scales with float32 activations; lrqgraph.runtime.session registers the library).
Lowering is a table of rules, one per (representation form, target) (see Representation.form):
 1. dense / lowrank / dense+lowrank / chains on ort and std: each chain becomes a chain of
    MatMulNBits (ort) or DequantizeLinear + MatMul (std) from X; chains are summed with Add.
 2. dense on lrq: one ``lrq::QMatMul``; lowrank and dense+lowrank: one ``lrq::QLowRankMatMul``
    (both rotate a rotated representation's input themselves); chains: QMatMul chains; codebook
    (Kashin with Hadamard transforms, k-means): ``lrq::KashinMatMul``. Other targets rotate the
    input with plain ops (Emitter.rotated), once per input and rotation.
 3. A form with no rule for the target is refused, naming the layer and the lowering that runs it.
Around the rule, per node:
 4. Gemm: alpha becomes a Mul after the sum; beta·C becomes the last node's bias input when the
    rule ends in one node (constant [N] C, alpha = 1) or an Add.
 5. The last node writes the original output tensor, so names and graph outputs are unchanged;
    every new node and tensor gets a name no part of the graph uses.
 6. Embedding tables (a layer with Gather nodes, see discover rule 6) take one dense 4- or 8-bit
    grid whose blocks divide the embedding dimension: ``ort`` (and ``lrq``, whose ops have no
    lookup) reads it with ``com.microsoft::GatherBlockQuantized`` over the bytes MatMulNBits (or,
    on ``lrq``, QMatMul: see layer_target) reads, so a tied lm_head and its table share one copy
    in the file; ``std`` gathers rows of Transpose(DequantizeLinear(codes)).
 7. Convolutions (a layer with ``kernel``, see discover rule 2) are standard ONNX on every target:
    each chain's factors dequantized from int4/int8 codes by ops onnxruntime folds when the session
    loads (so the file holds the codes and the convolutions run at float speed, the weights float
    in memory), reshaped to kernels, the first a convolution with the node's geometry, the others
    1×1 (see rewrite_conv).
Factor initializers are created once per weight, so shared weights stay shared.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper, version_converter
from onnx_graphsurgeon.ir.tensor import LazyValues

from lrqgraph.config import OptimizeConfig
from lrqgraph.errors import LrqError
from lrqgraph.external import stored_nbytes
from lrqgraph.graph import constant_values
from lrqgraph.latency import FOLDED, float_model
from lrqgraph.methods import LOWERINGS
from lrqgraph.methods.kashin import transform_refusal
from lrqgraph.model import IR_VERSION_INT4, ModelState
from lrqgraph.numerics import QuantizedTensor, Representation, pack_bits
from lrqgraph.numerics.kashin import KashinTensor
from lrqgraph.numerics.rotation import Rotation
from lrqgraph.passmanager import Context, Pass, PassManager, PassResult, register_pass
from lrqgraph.plan import Layer, LoweredLayer, loaded, use_plans
from lrqgraph.runtime.native_ops import library_path
from lrqgraph.runtime.op_schema import DOMAIN, OPS
from lrqgraph.version import __version__

log = logging.getLogger(__name__)

STD_OPSET = 21            # DequantizeLinear with block_size and int4 types
ORT_BITS = (2, 3, 4, 8)   # MatMulNBits code widths (symmetric 2 and 3 bits run as 4: see widened)
TARGETS = LOWERINGS


def _const(name: str, proto: onnx.TensorProto) -> gs.Constant:
    proto.name = name
    return gs.Constant(name, values=LazyValues(proto))


def _stored_nbytes(const: gs.Constant) -> int:
    # Read the proto we built; ``const.values`` would unpack int4 data into a numpy array.
    return stored_nbytes(const)


def _packed_tensor(name: str, values: np.ndarray, data_type: int) -> gs.Constant:
    """A 4-bit tensor: values (< 16, any shape) packed two per byte in row-major order."""
    flat = values.reshape(-1).astype(np.uint8) & 0xF
    proto = onnx.TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    proto.raw_data = pack_bits(flat[None, :], 4).tobytes()  # an odd count leaves a zero high nibble
    return _const(name, proto)


class Emitter:
    """Emits one weight's nodes: factor initializers once per weight, nodes for each consumer,
    every name unique in the model."""

    def __init__(self, model: ModelState, target: str, prefix: str, dtype: np.dtype,
                 accuracy_level: int | None = None, table: bool = False):
        self.model, self.graph, self.target, self.prefix = model, model.graph, target, prefix
        self.dtype = np.dtype(dtype)  # the layer's activations, in which its nodes compute
        # lrq: int8 activations unless told otherwise (its kernels are built for them)
        self.accuracy_level = 4 if accuracy_level is None and target == "lrq" else accuracy_level
        self._factors: dict[object, object] = {}
        self._folded: list[gs.Constant] = []  # stored constants that reach a node through a Cast
        self.stored_bytes = 0
        self.constants: list[gs.Constant] = []  # what stored_bytes counts: spilled once the layer is done
        self.nodes = 0
        self.table = table  # an embedding table's layer: its products read the codes its lookups read

    def array(self, name: str, array: np.ndarray) -> gs.Constant:
        name = self.model.unique_name(name)
        return _const(name, numpy_helper.from_array(np.ascontiguousarray(array), name))

    def _count(self, constants: list[gs.Constant]) -> None:
        self.stored_bytes += sum(_stored_nbytes(t) for t in constants)
        self.constants.extend(constants)

    def once(self, key: object, make: Callable[[str], "list[gs.Tensor] | dict[str, gs.Tensor]"]):
        """The initializers of one factor of this weight (a list or a dict), made on first use."""
        if key not in self._factors:
            tensors = make(f"{self.prefix}.lrq{key}" if not isinstance(key, tuple) else
                           f"{self.prefix}.lrq{key[0]}_{key[1]}")
            values = [*(tensors.values() if isinstance(tensors, dict) else tensors), *self._folded]
            self._folded.clear()
            self._count([t for t in values if isinstance(t, gs.Constant)])
            self._factors[key] = tensors
        return self._factors[key]

    def node(self, op: str, tag: str, inputs: list[gs.Tensor], attrs: dict | None = None, domain: str | None = None,
             dtype: np.dtype | None = None) -> gs.Variable:
        out = gs.Variable(self.model.unique_name(f"{tag}/{op}_out"), dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, self.model.unique_name(f"{tag}/{op}"), attrs or {}, inputs, [out],
                                        domain=domain))
        self.nodes += 1
        return out

    def cast(self, x: gs.Tensor, dtype: np.dtype, tag: str) -> gs.Variable:
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return self.node("Cast", tag, [x], {"to": to}, dtype=np.dtype(dtype))

    def rotated(self, x: gs.Tensor, rotation: Rotation, tag: str) -> gs.Variable:
        """X·R in plain ONNX ops, emitted once per (input, rotation) in the model: signs, the odd
        block, then the Walsh-Hadamard transform as two small MatMuls over a reshaped X (the
        layout of numerics/rotation.py). Its constants count as this layer's stored bytes."""
        key = ("rotation", x.name, rotation)
        if key in self.model.shared_values:
            return self.model.shared_values[key]
        io = self.dtype
        lead = [-1]  # every leading dimension in one: the input's rank need not be known
        factors = rotation.factors()
        stored = {name: self.array(f"rotation{rotation.k}_{rotation.seed}.{name}", v) for name, v in factors.items()}
        self._count(list(stored.values()))
        # ±1 bytes and float32 cast to the compute type, the normalization folded into the signs:
        # constants only, which onnxruntime folds when the session loads
        to_io = lambda t: t if t.dtype == io else self.cast(t, io, f"{tag}/rotate")  # noqa: E731
        f = {name: to_io(t) for name, t in stored.items() if name in ("h1", "h2", "small")}
        f["signs"] = to_io(self.node("Mul", f"{tag}/rotate", [self.cast(stored["signs"], np.float32, f"{tag}/rotate"),
                                                              stored["norm"]], dtype=np.float32))
        shape = lambda *dims: self.array(f"{tag}.rotation_shape", np.array(lead + list(dims), np.int64))  # noqa: E731
        p1, p2 = len(factors["h1"]), len(factors["h2"])
        odd = rotation.k // (p1 * p2)
        y = self.node("Mul", f"{tag}/rotate", [x, f["signs"]], dtype=io)
        y = self.node("Reshape", f"{tag}/rotate", [y, shape(p1 * p2, odd)], dtype=io)
        if "small" in f:
            y = self.node("MatMul", f"{tag}/rotate", [y, f["small"]], dtype=io)
        if p1 > 1:
            y = self.node("Reshape", f"{tag}/rotate", [y, shape(p1, p2 * odd)], dtype=io)
            y = self.node("MatMul", f"{tag}/rotate", [f["h1"], y], dtype=io)
        if p2 > 1:
            y = self.node("Reshape", f"{tag}/rotate", [y, shape(p1, p2, odd)], dtype=io)
            y = self.node("MatMul", f"{tag}/rotate", [f["h2"], y], dtype=io)
        x_shape = self.node("Shape", f"{tag}/rotate", [x], dtype=np.int64)
        y = self.node("Reshape", f"{tag}/rotate", [y, x_shape], dtype=io)
        self.model.shared_values[key] = y
        return y

    def rotation_inputs(self, rotation: Rotation) -> dict[str, gs.Constant]:
        """The lrq ops' rotation inputs for F (signs as float16, exact for ±1; the odd block in
        float32), stored once per rotation in the model and counted with the layer that makes them."""
        key = ("rotation inputs", rotation)
        if key not in self.model.shared_values:
            axis = rotation.axis
            made = {"rotation_signs": self.array(f"rotation{rotation.k}_{rotation.seed}.signs",
                                                 axis.signs.astype(np.float16))}
            if axis.small is not None:
                made["rotation_small"] = self.array(f"rotation{rotation.k}_{rotation.seed}.small",
                                                    axis.small.astype(np.float32))
            self._count(list(made.values()))
            self.model.shared_values[key] = made
        return self.model.shared_values[key]

    # -- factor layouts -------------------------------------------------------------------------
    def stored_scales(self, name: str, scales: np.ndarray) -> gs.Tensor:
        """Scales as stored (float16 of a float32 layer: half the bytes in the file), cast to the
        compute type by a Cast of the constant, which onnxruntime folds when the session loads."""
        stored = self.array(name, scales)
        if scales.dtype == self.dtype:
            return stored
        self._folded.append(stored)  # counted as stored, the Cast's output is not
        return self.cast(stored, self.dtype, name)

    def ort_factor(self, name: str, q: QuantizedTensor) -> list[gs.Tensor]:
        if widened(q):
            codes = self.widened_codes(name, q)
        else:  # MatMulNBits stores row n = column n of W, blocks along K
            codes = self.array(f"{name}.q", q.packed_columns()[0])
        tensors = [codes, self.stored_scales(f"{name}.scales", q.scales.T.reshape(-1))]
        if q.zero_points is not None:
            tensors.append(self.array(f"{name}.zp", pack_bits(q.zero_points.T, q.bits)))
        return tensors

    def widened_codes(self, name: str, q: QuantizedTensor) -> gs.Tensor:
        """Symmetric 2- or 3-bit codes stored at their width and widened to MatMulNBits' 4-bit layout
        by table lookups on constants (lookup_tables), which onnxruntime folds when the session
        loads: the file holds b bits a weight, the fast 4-bit kernel runs them, and loading holds
        about 4.5 bytes a weight on top for a moment (integer arithmetic over the codes held 30).
        The codes move by 8 - 2^(b-1) so that the 4-bit kernel's implicit zero point 8 stands for
        theirs. 2 bits: each stored byte (4 codes) is looked up as its 2 bytes of nibbles. 3 bits:
        two streams, the low 2 bits of each code (4 a byte) and its high bit (8 a byte); a low byte
        and the 4 high bits of its codes index a 4096-entry table."""
        n, blocks = q.shape[1], q.scales.shape[0]
        codes = q.padded_codes().T.reshape(-1)  # MatMulNBits order: column by column, blocks along K
        tables = self.lookup_tables()
        if q.bits == 2:
            low = self.array(f"{name}.q2", pack_bits(codes[None, :], 2)[0])
            self._folded.append(low)  # counted as stored; the widened bytes exist only in the session
            x = self.node("Gather", "widen", [tables["w2"], self.cast(low, np.int32, "widen")], {"axis": 0},
                          dtype=np.uint8)
        else:
            low = self.array(f"{name}.q3lo", pack_bits(codes[None, :] & 3, 2)[0])
            high = self.array(f"{name}.q3hi", pack_bits(codes[None, :] >> 2, 1)[0])
            self._folded.extend([low, high])
            nibbles = self.node("Gather", "widen", [tables["halves"], self.cast(high, np.int32, "widen")], {"axis": 0},
                                dtype=np.int32)  # [bytes, 2]: the high bits of 4 codes each
            nibbles = self.node("Reshape", "widen", [nibbles, tables["flat"]], dtype=np.int32)
            index = self.node("Mul", "widen", [self.cast(low, np.int32, "widen"), tables["sixteen"]], dtype=np.int32)
            index = self.node("Add", "widen", [index, nibbles], dtype=np.int32)
            x = self.node("Gather", "widen", [tables["w3"], index], {"axis": 0}, dtype=np.uint8)
        shape = self.array(f"{name}.widen_shape", np.array([n, blocks, q.block_size // 2], np.int64))
        return self.node("Reshape", "widen", [x, shape], dtype=np.uint8)

    def lookup_tables(self) -> dict[str, gs.Tensor]:
        """The widening tables, made once per model from Range by ops onnxruntime folds (the file
        holds a few scalars): w2 [256, 2] (a byte of four 2-bit codes as two bytes of 4-bit
        nibbles), halves [256, 2] (a byte's two nibbles), w3 [4096, 2] (4 codes' low bits · 16 +
        their high bits as two bytes of nibbles)."""
        key = ("widen tables",)
        if key not in self.model.shared_values:
            byte = self.index_column(256)
            index = self.index_column(4096)
            low = self.node("Div", "table", [index, self.ints("table.16", [16])], dtype=np.int32)
            high = self.node("Mod", "table", [index, self.ints("table.16", [16])], dtype=np.int32)
            three = self.node("Add", "table", [self.digits(low, 4, 4), self.node(
                "Mul", "table", [self.digits(high, 2, 4), self.ints("table.4", [4])], dtype=np.int32)], dtype=np.int32)
            self.model.shared_values[key] = {
                "w2": self.nibble_pairs(self.digits(byte, 4, 4), 6), "w3": self.nibble_pairs(three, 4),
                "halves": self.digits(byte, 16, 2),
                "sixteen": self.ints("widen.sixteen", [16]), "flat": self.array("widen.flat", np.array([-1], np.int64))}
        return self.model.shared_values[key]

    def ints(self, name: str, values: list[int]) -> gs.Constant:
        return self.array(name, np.asarray(values, np.int32))

    def index_column(self, count: int) -> gs.Variable:
        """[count, 1] int32: 0, 1, ..., count - 1 (Range, folded when the session loads)."""
        def scalar(name: str, value: int) -> gs.Constant:  # (array() makes one-element vectors)
            name = self.model.unique_name(name)
            return _const(name, numpy_helper.from_array(np.array(value, np.int32), name))
        r = self.node("Range", "table", [scalar("table.start", 0), scalar("table.count", count),
                                         scalar("table.step", 1)], dtype=np.int32)
        return self.node("Unsqueeze" if self.model.opset >= 13 else "Reshape", "table",
                         [r, self.array("table.axis", np.array([1], np.int64)) if self.model.opset >= 13 else
                          self.array("table.column", np.array([-1, 1], np.int64))], dtype=np.int32)

    def digits(self, x: gs.Tensor, base: int, count: int) -> gs.Variable:
        """[m, count] int32: the base-``base`` digits of x [m, 1], least significant first."""
        x = self.node("Div", "table", [x, self.ints("table.powers", [base ** j for j in range(count)])], dtype=np.int32)
        return self.node("Mod", "table", [x, self.ints("table.base", [base])], dtype=np.int32)

    def nibble_pairs(self, codes: gs.Tensor, offset: int) -> gs.Variable:
        """[m, 4] codes -> [m, 2] uint8 bytes of two 4-bit nibbles (code + offset), low nibble first."""
        x = self.node("Add", "table", [codes, self.ints("table.offset", [offset])], dtype=np.int32)
        x = self.node("Reshape", "table", [x, self.array("table.pairs", np.array([-1, 2, 2], np.int64))], dtype=np.int32)
        x = self._reduce_sum(self.node("Mul", "table", [x, self.ints("table.nibbles", [1, 16])], dtype=np.int32),
                             self.array("table.last", np.array([-1], np.int64)), 0)
        return self.cast(x, np.uint8, "table")

    def _reduce_sum(self, x: gs.Tensor, axes: gs.Constant, keepdims: int, dtype: type = np.int32) -> gs.Variable:
        if self.model.opset >= 13:
            return self.node("ReduceSum", "unpack", [x, axes], {"keepdims": keepdims}, dtype=dtype)
        return self.node("ReduceSum", "unpack", [x], {"axes": [-1], "keepdims": keepdims}, dtype=dtype)

    def folded_weight(self, name: str, rep: Representation) -> gs.Variable:
        """Ŵ [K, N] in the layer's dtype from the stored codes, by ops on constants only (the FOLD
        rule): each factor dequantized, chains multiplied and summed, a rotation applied as R·W'."""
        total = None
        for ci, chain in enumerate(rep.chains):
            w = None
            for fi, q in enumerate(chain):
                f = self.folded_factor(f"{name}{ci}_{fi}", q)
                w = f if w is None else self.node("MatMul", "fold", [w, f])
            total = w if total is None else self.node("Add", "fold", [total, w])
        if rep.rotation is not None:  # R·W', R = I·R made once per rotation (one product holds the weight
            total = self.node("MatMul", "fold", [self.rotation_matrix(rep.rotation), total])  # once more)
        return total

    def rotation_matrix(self, rotation: Rotation) -> gs.Variable:
        """R [K, K] as the rows of the identity through the rotation's plain ops (folded at load)."""
        key = ("rotation matrix", rotation)
        if key not in self.model.shared_values:
            k = rotation.k
            zeros = self.node("ConstantOfShape", "fold", [self.array("fold.square", np.array([k, k], np.int64))],
                              {"value": numpy_helper.from_array(np.zeros(1, self.dtype))})
            eye = self.node("EyeLike", "fold", [zeros])
            self.model.shared_values[key] = self.rotated(eye, rotation, "fold")
        return self.model.shared_values[key]

    def folded_factor(self, name: str, q: QuantizedTensor) -> gs.Variable:
        """(codes − zero points) · scales of one uniform grid as [K, N], blocks along K: the codes
        stored row-major as one bit stream (never more bytes than the per-block packing counted),
        2-, 4- and 8-bit codes turned into their levels by one table lookup per byte (loading holds
        about 10 bytes a weight on top for a moment), other widths by integer arithmetic."""
        k, n = q.shape
        blocks = q.scales.shape[0]
        width = blocks * q.block_size
        codes = q.padded_codes()
        shape = lambda *dims: self.array(f"{name}.shape", np.array(dims, np.int64))  # noqa: E731
        center = 0 if q.zero_points is not None else 1 << (q.bits - 1)
        if q.bits in LEVEL_TABLE_BITS:
            stored = self.array(f"{name}.q{q.bits}", pack_bits(codes.reshape(1, -1), q.bits)[0])
            self._folded.append(stored)  # counted as stored; the float weight exists only in the session
            w = self.node("Gather", "fold", [self.level_table(q.bits, center), self.cast(stored, np.int32, "fold")],
                          {"axis": 0})
        else:
            w = self.node("Sub", "fold", [self.cast(self.unpacked(f"{name}.q", codes, q.bits), self.dtype, "fold"),
                                          self.array(f"{name}.center", np.array(center, self.dtype))])
        w = self.node("Reshape", "fold", [w, shape(blocks, q.block_size, n)])
        if q.zero_points is not None:
            zero = self.node("Reshape", "fold", [self.unpacked(f"{name}.zp", q.zero_points, q.bits), shape(blocks, 1, n)],
                             dtype=np.int32)
            w = self.node("Sub", "fold", [w, self.cast(zero, self.dtype, "fold")])
        scales = self.node("Reshape", "fold", [self.stored_scales(f"{name}.scales", q.scales), shape(blocks, 1, n)])
        w = self.node("Reshape", "fold", [self.node("Mul", "fold", [w, scales]), shape(width, n)])
        return self.node("Slice", "fold", [w, shape(0), shape(k), shape(0)]) if width != k else w

    def level_table(self, bits: int, center: int) -> gs.Tensor:
        """[256, 8 / bits] in the layer's dtype: the codes of a byte (least significant first), less
        ``center``; made once per model from Range by ops onnxruntime folds."""
        key = ("levels", bits, center, str(self.dtype))
        if key not in self.model.shared_values:
            levels = self.node("Sub", "table", [self.digits(self.index_column(256), 1 << bits, 8 // bits),
                                                self.ints("table.center", [center])], dtype=np.int32)
            self.model.shared_values[key] = self.cast(levels, self.dtype, "table")
        return self.model.shared_values[key]

    def unpacked(self, name: str, codes: np.ndarray, bits: int) -> gs.Variable:
        """int32 codes [count] from one stored stream of ``bits``-bit codes (pack_bits order), by
        integer ops on the constant: groups of g bytes (8g/bits codes each) read as one integer."""
        count = codes.size
        group = bits // np.gcd(bits, 8)
        stream = pack_bits(codes.reshape(1, -1), bits)[0]
        stream = np.concatenate([stream, np.zeros(-len(stream) % group, np.uint8)])
        stored = self.array(name, stream)
        self._folded.append(stored)  # counted as stored; the unpacked codes exist only in the session
        if bits == 8:
            return self.cast(stored, np.int32, "fold")
        wide = np.int32 if group <= 3 else np.int64  # 8 codes of 5 or 7 bits span 40 or 56 bits
        c = self.unpack_constants(bits, group, wide)
        x = self.cast(self.node("Reshape", "fold", [stored, c["groups"]], dtype=np.uint8), wide, "fold")
        x = self._reduce_sum(self.node("Mul", "fold", [x, c["bytes"]], dtype=wide), c["axes"], 1, wide)
        x = self.node("Mod", "fold", [self.node("Div", "fold", [x, c["shifts"]], dtype=wide), c["range"]], dtype=wide)
        x = self.node("Reshape", "fold", [x, c["flat"]], dtype=wide)
        x = self.node("Slice", "fold", [x, c["start"], self.array(f"{name}.count", np.array([count], np.int64))],
                      dtype=wide)
        return self.cast(x, np.int32, "fold") if wide != np.int32 else x

    def unpack_constants(self, bits: int, group: int, wide: type) -> dict[str, gs.Constant]:
        key = ("unpack", bits)
        if key not in self.model.shared_values:
            values = {"groups": np.array([-1, group], np.int64), "bytes": np.array([256 ** i for i in range(group)], wide),
                      "shifts": np.array([1 << (bits * j) for j in range(8 * group // bits)], wide),
                      "range": np.array([1 << bits], wide), "axes": np.array([-1], np.int64),
                      "flat": np.array([-1], np.int64), "start": np.array([0], np.int64)}
            self.model.shared_values[key] = {k: self.array(f"unpack{bits}.{k}", v) for k, v in values.items()}
        return self.model.shared_values[key]

    def lrq_factor(self, name: str, q: QuantizedTensor) -> list[gs.Tensor]:
        """codes, scales, zero points (or an empty placeholder): the three inputs of an lrq weight."""
        codes, scales, zero_points = q.packed_columns()
        return [self.array(f"{name}.q", codes), self.array(f"{name}.scales", scales),
                self.array(f"{name}.zp", zero_points) if zero_points is not None else gs.Variable.empty()]

    def std_factor(self, name: str, q: QuantizedTensor) -> list[gs.Tensor]:
        half = 1 << (q.bits - 1)
        scales = self.stored_scales(f"{name}.scales", q.scales)
        if q.bits <= 4:
            if q.symmetric:  # signed two's-complement nibbles, implicit zero point 0
                return [_packed_tensor(self.model.unique_name(f"{name}.q"), q.codes.astype(np.int16) - half,
                                       onnx.TensorProto.INT4), scales]
            return [_packed_tensor(self.model.unique_name(f"{name}.q"), q.codes, onnx.TensorProto.UINT4), scales,
                    _packed_tensor(self.model.unique_name(f"{name}.zp"), q.zero_points, onnx.TensorProto.UINT4)]
        if q.symmetric:
            return [self.array(f"{name}.q", (q.codes.astype(np.int16) - half).astype(np.int8)), scales]
        return [self.array(f"{name}.q", q.codes), scales, self.array(f"{name}.zp", q.zero_points)]

    def bias(self, tag: str, bias: np.ndarray, dtype: np.dtype) -> gs.Constant:
        return self.array(f"{tag}.bias", bias.astype(dtype))


def lrq_node(em: Emitter, op: str, tag: str, named: dict[str, gs.Tensor], attrs: dict) -> gs.Variable:
    """One lrq custom-op node, its inputs placed by name as runtime/op_schema.py orders them."""
    schema = OPS[op]
    unknown = set(named) - {i.name for i in schema.inputs}
    missing = [a for a in schema.attributes if a not in attrs]
    if unknown or missing:
        raise ValueError(f"lrq::{op}: inputs {sorted(unknown)} unknown, attributes {missing} missing")
    last = max(schema.index(name) for name in named)
    inputs = [named.get(i.name) or gs.Variable.empty() for i in schema.inputs[:last + 1]]
    return em.node(op, tag, inputs, attrs, domain=DOMAIN)


# -- rules: (form, target) -> emit(em, x, rep, tag, bias) -> output --------------------------------
Rule = Callable[[Emitter, gs.Tensor, Representation, str, "np.ndarray | None"], gs.Variable]
RULES: dict[tuple[str, str], Rule] = {}
# rules that end in one node, which can carry the bias; rules whose node applies the input rotation
FUSES_BIAS: set[tuple[str, str]] = set()
ROTATES: set[tuple[str, str]] = set()


def rule(forms: tuple[str, ...], targets: tuple[str, ...], fuses_bias: bool = False,
         rotates: bool = False) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for form in forms:
            for target in targets:
                RULES[form, target] = fn
                if fuses_bias:
                    FUSES_BIAS.add((form, target))
                if rotates:
                    ROTATES.add((form, target))
        return fn
    return wrap


def widened(q: QuantizedTensor) -> bool:
    """Whether ``ort`` runs these codes through the 4-bit kernel (Emitter.widened_codes): symmetric
    2- and 3-bit grids (onnxruntime's own 2-bit CPU kernel dequantizes on every call)."""
    return isinstance(q, QuantizedTensor) and q.codebook is None and q.bits in (2, 3) and q.symmetric


def _ort_matmul(em: Emitter, x: gs.Tensor, q: QuantizedTensor, key, tag: str, bias) -> gs.Variable:
    factors = em.once(key, lambda name: em.ort_factor(name, q))
    inputs = [x, *factors[:2], factors[2] if len(factors) > 2 else gs.Variable.empty()]
    if bias is not None:
        inputs += [gs.Variable.empty(), em.bias(tag, bias, em.dtype)]
    level = em.accuracy_level
    if level is None:  # 8-bit codes only have a fast CPU path with int8 activations
        level = 4 if q.bits == 8 else 0
    k, n = q.shape
    attrs = {"K": k, "N": n, "bits": 4 if widened(q) else q.bits, "block_size": q.block_size, "accuracy_level": level}
    return em.node("MatMulNBits", tag, inputs, attrs, domain="com.microsoft")


def _std_matmul(em: Emitter, x: gs.Tensor, q: QuantizedTensor, key, tag: str, bias) -> gs.Variable:
    factors = em.once(key, lambda name: em.std_factor(name, q))
    deq = em.node("DequantizeLinear", tag, list(factors), {"axis": 0, "block_size": q.block_size})
    return em.node("MatMul", tag, [x, deq])


def _lrq_matmul(em: Emitter, x: gs.Tensor, q: QuantizedTensor, key, tag: str, bias,
                rotation: Rotation | None = None, factors: list[gs.Tensor] | None = None) -> gs.Variable:
    """One lrq::QMatMul node; ``factors`` (codes, scales[, zero points]): initializers another
    node already reads, else this weight's own (made once)."""
    codes, scales, zp = [*(factors or em.once(key, lambda name: em.lrq_factor(name, q))), gs.Variable.empty()][:3]
    named = {"X": x, "B_codes": codes, "B_scales": scales, "B_zero_points": zp}
    if bias is not None:
        named["bias"] = em.bias(tag, bias, np.float32)
    k, n = q.shape
    attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size, "accuracy_level": em.accuracy_level}
    return lrq_node(em, "QMatMul", tag, {**named, **_rotation(em, rotation, attrs)}, attrs)


def _rotation(em: Emitter, rotation: Rotation | None, attrs: dict) -> dict[str, gs.Tensor]:
    """An lrq node's rotation inputs (none without one); its seed goes to ``attrs`` (relower reads it)."""
    if rotation is None:
        return {}
    attrs["rotation_seed"] = rotation.seed
    return em.rotation_inputs(rotation)


def _chains(matmul) -> Rule:
    def emit(em: Emitter, x: gs.Tensor, rep: Representation, tag: str, bias) -> gs.Variable:
        sums = []
        for ci, chain in enumerate(rep.chains):
            h = x
            for fi, q in enumerate(chain):
                last = fi == len(chain) - 1
                h = matmul(em, h, q, (ci, fi), tag, bias if last and ci == 0 else None)
            sums.append(h)
        out = sums[0]
        for other in sums[1:]:
            out = em.node("Add", tag, [out, other])
        return out
    return emit


rule(("dense",), ("ort",), fuses_bias=True)(_chains(_ort_matmul))
rule(("lowrank", "dense+lowrank", "chains"), ("ort",))(_chains(_ort_matmul))
rule(("dense", "lowrank", "dense+lowrank", "chains"), ("std",))(_chains(_std_matmul))
rule(("chains",), ("lrq",))(_chains(_lrq_matmul))


FOLD = FOLDED  # a per-layer lowering (LayerPlan.lowering), never a model's: see _fold
LEVEL_TABLE_BITS = (2, 4, 8)  # code widths a folded weight reads through a table of levels per byte


@rule(("dense", "lowrank", "dense+lowrank", "chains"), (FOLD,), rotates=True)
def _fold(em: Emitter, x: gs.Tensor, rep: Representation, tag: str, bias) -> gs.Variable:
    """X·Ŵ with Ŵ rebuilt from the stored codes by ops on constants (Emitter.folded_weight), which
    onnxruntime folds into a float initializer when the session loads: the file holds the codes,
    the layer runs as the float MatMul does, in float memory. Where a layer's products are
    compute-bound (many rows: encoders, prefill), no quantized kernel beats that."""
    w = em.once("folded", lambda name: {"w": em.folded_weight(name, rep)})["w"]
    return em.node("MatMul", tag, [x, w])


@rule(("dense",), ("lrq",), fuses_bias=True, rotates=True)
def _lrq_dense(em: Emitter, x: gs.Tensor, rep: Representation, tag: str, bias) -> gs.Variable:
    """One lrq::QMatMul node for (X·F)·W (+ bias); a table's tied lm_head reads the initializers
    its GatherBlockQuantized reads (rule 6): the codes, and the scales as stored."""
    q = rep.chains[0][0]
    if not em.table:
        return _lrq_matmul(em, x, q, (0, 0), tag, bias, rep.rotation)
    codes, scales = em.once((0, 0), lambda name: em.ort_factor(name, q))[:2]
    if not isinstance(scales, gs.Constant):  # the load-time Cast of float16 scales: the op takes them as stored
        scales = scales.inputs[0].inputs[0]
    return _lrq_matmul(em, x, q, (0, 0), tag, bias, factors=[codes, scales])


@rule(("lowrank", "dense+lowrank"), ("lrq",), fuses_bias=True, rotates=True)
def _lrq_lowrank(em: Emitter, x: gs.Tensor, rep: Representation, tag: str, bias) -> gs.Variable:
    """One lrq::QLowRankMatMul node for (X·F)·L·R (+ (X·F)·Q) (+ bias)."""
    dense = next(((c[0], (i, 0)) for i, c in enumerate(rep.chains) if len(c) == 1), None)
    i, (left, right) = next((i, c) for i, c in enumerate(rep.chains) if len(c) == 2)
    attrs = {"K": left.shape[0], "N": right.shape[1], "rank": left.shape[1], "accuracy_level": em.accuracy_level}
    named = {"X": x}
    for prefix, q, key in (("L", left, (i, 0)), ("R", right, (i, 1)), ("Q", *(dense or (None, None)))):
        if q is None:
            continue
        codes, scales, zp = em.once(key, lambda name, q=q: em.lrq_factor(name, q))
        named.update({f"{prefix}_codes": codes, f"{prefix}_scales": scales, f"{prefix}_zero_points": zp})
        attrs[f"{prefix.lower()}_bits"], attrs[f"{prefix.lower()}_block_size"] = q.bits, q.block_size
    if bias is not None:
        named["bias"] = em.bias(tag, bias, np.float32)
    return lrq_node(em, "QLowRankMatMul", tag, {**named, **_rotation(em, rep.rotation, attrs)}, attrs)


@rule(("codebook",), ("lrq",), fuses_bias=True)
def _lrq_codebook(em: Emitter, x: gs.Tensor, rep: Representation, tag: str, bias) -> gs.Variable:
    """One lrq::KashinMatMul node: X·(U + F1·V·F2ᵀ) for Kashin, X·U for a k-means codebook."""
    t = rep.chains[0][0]
    kashin = isinstance(t, KashinTensor)
    codes = t.pairs if kashin else t
    k, n = codes.shape

    def make(name: str) -> dict[str, gs.Tensor]:
        book = (codes.codebook * t.norm if kashin else codes.codebook.reshape(-1, 1)).astype(np.float32)
        tensors = {"codes": em.array(f"{name}.codes", pack_bits(codes.codes.T, codes.bits)),
                   "codebook": em.array(f"{name}.codebook", book)}
        for axis, label in ((t.transform.rows, "row"), (t.transform.cols, "col")) if kashin else ():
            tensors[f"{label}_signs"] = em.array(f"{name}.{label}_signs", axis.signs.astype(np.float32))
            if axis.small is not None:
                tensors[f"{label}_small"] = em.array(f"{name}.{label}_small", axis.small)
        return tensors

    named = {"X": x, **em.once("codebook", make)}
    if bias is not None:
        named["bias"] = em.bias(tag, bias, np.float32)
    return lrq_node(em, "KashinMatMul", tag, named, {"K": k, "N": n, "bits": codes.bits})


def check_ort_compatible(name: str, rep: Representation) -> None:
    for chain in rep.chains:
        for q in chain:
            if q.bits not in ORT_BITS or (q.bits == 3 and not widened(q)):
                raise LrqError(f"layer '{name}': {q.bits}-bit codes have no MatMulNBits kernel "
                               f"(bits {', '.join(map(str, ORT_BITS))}); use --lowering std or lrq, or --bits 4")
            if q.block_size & (q.block_size - 1) or not 16 <= q.block_size <= 256:
                raise LrqError(f"layer '{name}': MatMulNBits needs a power-of-two block size in "
                               f"16..256, got {q.block_size}; use --block-size 32 or --lowering std")


TABLE_BITS = (4, 8)  # what GatherBlockQuantized reads


def layer_target(layer: Layer, target: str, rep: Representation | None = None) -> str:
    """The lowering a layer gets: convolutions (rule 7) are standard ONNX on every target
    (MatMulNBits and the lrq ops multiply matrices only). lrq's ops have no row lookup, so a table
    is read by onnxruntime's GatherBlockQuantized; its tied lm_head multiplies by the same codes
    with lrq::QMatMul where that op takes them as they are (symmetric codes of up to 4 bits, the
    widths its int8 kernels multiply on every CPU, in a float32 layer), else with MatMulNBits."""
    if layer.kernel:
        return "std"
    if target == "lrq" and layer.gathers and not (rep is not None and lrq_reads_table(layer, rep)):
        return "ort"
    return target


def lrq_reads_table(layer: Layer, rep: Representation) -> bool:
    """Whether lrq::QMatMul can read a table's codes and scales as GatherBlockQuantized reads them."""
    q = rep.chains[0][0]
    return (rep.form == "dense" and rep.rotation is None and q.zero_points is None and q.bits <= 4
            and np.dtype(layer.dtype) == np.float32)


CONV_FORMS = ("dense", "lowrank", "dense+lowrank", "chains")


def check_conv(name: str, rep: Representation, groups: int = 1) -> None:
    """Rule 7's limits: chains of quantized matrices, no input rotation (a patch is not a vector
    the ops could rotate); a grouped convolution one dense matrix (a factor W₁[K, r] would mix the
    groups' output channels)."""
    if rep.form not in CONV_FORMS or rep.rotation is not None:
        raise LrqError(f"layer '{name}': a convolution takes dense or low-rank quantized factors, not {rep.method} "
                       f"({rep.form}{', rotated' if rep.rotation is not None else ''})")
    if groups > 1 and rep.form != "dense":
        raise LrqError(f"layer '{name}': a grouped convolution (group={groups}) takes a dense grid, not "
                       f"{rep.method} ({rep.form}); use a dense method (rtn, gptq) for it")


def check_table(name: str, rep: Representation) -> None:
    """Rule 6's limits on an embedding table's representation."""
    q = rep.chains[0][0]
    if rep.form != "dense" or rep.rotation is not None:
        raise LrqError(f"layer '{name}': an embedding table takes a dense grid, not {rep.method} ({rep.form}"
                       f"{', rotated' if rep.rotation is not None else ''})")
    k = q.shape[0]
    if q.bits not in TABLE_BITS or q.block_size & (q.block_size - 1) or not 16 <= q.block_size <= 256 \
            or k % q.block_size:
        raise LrqError(f"layer '{name}': an embedding table needs 4 or 8 bits in power-of-two blocks of 16..256 "
                       f"that divide its dimension {k}, got {q.bits} bits in blocks of {q.block_size}")


def check_form(layer: Layer, rep: Representation) -> None:
    """The limits of the layer's kind on its representation: tables (rule 6), convolutions (rule 7)."""
    if layer.gathers:
        check_table(layer.name, rep)
    if layer.kernel:
        check_conv(layer.name, rep, layer.groups)


def check_layer(layer: Layer, rep: Representation, target: str) -> None:
    """check_lowerable for a layer as ``lower`` will emit it (tables and convolutions included)."""
    check_form(layer, rep)
    check_lowerable(layer.name, rep, layer_target(layer, target, rep), layer.dtype)


def check_lowerable(name: str, rep: Representation, target: str, io_dtype: str) -> None:
    """Rule 3 and each target's limits: a one-line error naming the layer and the fix."""
    if (rep.form, target) not in RULES:
        runs = sorted(t for (form, t) in RULES if form == rep.form)
        raise LrqError(f"layer '{name}': method {rep.method} gives a {rep.form} weight, which "
                       f"{'only --lowering ' + ' or '.join(runs) + ' runs' if runs else 'no lowering runs'}")
    if target == "ort":
        check_ort_compatible(name, rep)
    kashin = rep.chains[0][0] if rep.form == "codebook" else None
    if isinstance(kashin, KashinTensor) and transform_refusal(kashin.transform.kind):
        raise LrqError(f"layer '{name}': {transform_refusal(kashin.transform.kind)}")
    if target == "lrq" and np.dtype(io_dtype) != np.float32:
        raise LrqError(f"layer '{name}': the lrq lowering takes float32 layers, this one is {io_dtype}; "
                       f"use --lowering ort")


def _gemm_bias(node: gs.Node) -> tuple[gs.Tensor | None, np.ndarray | None, float]:
    """(C tensor, constant C values or None, beta) of a Gemm; (None, None, 1) for MatMul."""
    if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
        return None, None, 1.0
    c = node.inputs[2]
    return c, constant_values(c), float(node.attrs.get("beta", 1.0))


def rewrite_node(em: Emitter, node: gs.Node, rep: Representation, tag: str) -> None:
    """Replace one MatMul/Gemm node by the rule's nodes (cases 4 and 5)."""
    x, y = node.inputs[0], node.outputs[0]
    c, c_values, beta = _gemm_bias(node)
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    key = (rep.form, em.target)
    vector_bias = None
    if c_values is not None and c_values.size == rep.shape[1] and c_values.shape[-1:] == (rep.shape[1],) \
            and alpha == 1.0 and key in FUSES_BIAS:
        vector_bias = (beta * c_values.astype(np.float32)).reshape(-1)
    node.inputs.clear()
    node.outputs.clear()
    if rep.rotation is not None and key not in ROTATES:
        x = em.rotated(x, rep.rotation, tag)
    h = RULES[key](em, x, rep, tag, vector_bias)
    io = em.dtype
    if alpha != 1.0:
        h = em.node("Mul", f"{tag}/alpha", [h, em.array(f"{tag}.alpha", np.array(alpha, io))], dtype=io)
    if c is not None and vector_bias is None:
        if beta != 1.0:
            c = em.node("Mul", f"{tag}/beta", [c, em.array(f"{tag}.beta", np.array(beta, io))], dtype=io)
        h = em.node("Add", f"{tag}/bias", [h, c], dtype=io)
    producer = h.inputs[0]
    producer.outputs.clear()
    producer.outputs.append(y)


def rewrite_gather(em: Emitter, node: gs.Node, rep: Representation, tag: str) -> None:
    """Rule 6: a Gather of table rows from the layer's stored codes (the factors of chain 0, the
    same initializers the lm_head of a tied layer reads)."""
    q = rep.chains[0][0]
    ids, y = node.inputs[1], node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    k, n = q.shape
    if em.target == "std":
        factors = em.once((0, 0), lambda name: em.std_factor(name, q))
        w = em.node("DequantizeLinear", tag, list(factors), {"axis": 0, "block_size": q.block_size})
        table = em.node("Transpose", tag, [w], {"perm": [1, 0]})
        h = em.node("Gather", tag, [table, ids], {"axis": 0})
    else:
        factors = em.once((0, 0), lambda name: em.ort_factor(name, q))
        blocks = -(-k // q.block_size)
        shape = lambda *dims: em.array(f"{tag}.shape", np.array(dims, np.int64))  # noqa: E731
        data = em.node("Reshape", tag, [factors[0], shape(n, k * q.bits // 8)], dtype=np.uint8)
        scales = em.node("Reshape", tag, [factors[1], shape(n, blocks)])
        inputs = [data, ids, scales] + ([factors[2]] if len(factors) > 2 else [])
        h = em.node("GatherBlockQuantized", tag, inputs, {"gather_axis": 0, "quantize_axis": 1, "bits": q.bits,
                                                          "block_size": q.block_size}, domain="com.microsoft")
    producer = h.inputs[0]
    producer.outputs.clear()
    producer.outputs.append(y)


def _dequantized(em: Emitter, factors: list[gs.Tensor], q: QuantizedTensor, tag: str) -> gs.Variable:
    """W[K, N] = (codes − zero points) · scales, blockwise along K, in ops onnxruntime folds into a
    float constant when the session loads (Cast, Sub, Mul, Expand, Reshape, Slice: it never folds
    DequantizeLinear, which would then run on every call and double a CNN's latency)."""
    k, n = q.shape
    blocks = -(-k // q.block_size)

    def rows(t: gs.Tensor) -> gs.Variable:  # [blocks, N] -> [K, N], each row of a block repeated
        shape = lambda *dims: em.array(f"{tag}.shape", np.array(dims, np.int64))  # noqa: E731
        t = em.node("Reshape", tag, [t, shape(blocks, 1, n)], dtype=t.dtype)
        t = em.node("Expand", tag, [t, shape(blocks, q.block_size, n)], dtype=t.dtype)
        t = em.node("Reshape", tag, [t, shape(blocks * q.block_size, n)], dtype=t.dtype)
        return em.node("Slice", tag, [t, shape(0), shape(k), shape(0)], dtype=t.dtype)
    w = em.cast(factors[0], em.dtype, tag)
    if len(factors) > 2:
        w = em.node("Sub", tag, [w, rows(em.cast(factors[2], em.dtype, tag))])
    return em.node("Mul", tag, [w, rows(factors[1])])


def rewrite_conv(em: Emitter, node: gs.Node, rep: Representation, tag: str, kernel: tuple[int, ...]) -> None:
    """Rule 7: a Conv as chains of convolutions over the codes (W[K, N] dequantized by foldable
    ops, then Transpose and Reshape to a kernel): each chain's first factor W₁[C_in·kh·kw, r] is a
    convolution with the node's geometry (strides, pads, dilations, auto_pad) and r output
    channels, the next ones 1×1 convolutions; chains are summed, the bias joins chain 0's last."""
    x, y = node.inputs[0], node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    geometry = {k: v for k, v in node.attrs.items()
                if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
    node.inputs.clear()
    node.outputs.clear()
    sums = []
    for ci, chain in enumerate(rep.chains):
        h = x
        for fi, q in enumerate(chain):
            k, n = q.shape
            factors = em.once((ci, fi), lambda name: em.std_factor(name, q))
            w = em.node("Transpose", tag, [_dequantized(em, factors, q, tag)], {"perm": [1, 0]})
            shape = (n, *kernel[1:]) if fi == 0 else (n, k, 1, 1)
            w = em.node("Reshape", tag, [w, em.array(f"{tag}.kernel_shape", np.array(shape, np.int64))])
            last_of_first = ci == 0 and fi == len(chain) - 1
            inputs = [h, w] + ([bias] if last_of_first and bias is not None else [])
            h = em.node("Conv", tag, inputs, geometry if fi == 0 else {})
        sums.append(h)
    out = sums[0]
    for other in sums[1:]:
        out = em.node("Add", tag, [out, other])
    producer = out.inputs[0]
    producer.outputs.clear()
    producer.outputs.append(y)


def lower_layer(model: ModelState, layer: Layer, rep: Representation, target: str,
                accuracy_level: int | None) -> LoweredLayer:
    """Rewrite every node of ``layer`` (the replaced nodes are dropped; cleanup removes the rest)."""
    check_layer(layer, rep, target)
    if accuracy_level is None and target == "lrq":  # tables on MatMulNBits too, at lrq's int8 activations
        accuracy_level = 4
    target = layer_target(layer, target, rep)
    # float16 scales of a float32 layer are stored as float16 and cast once when onnxruntime loads
    # the model (Emitter.stored_scales); the lrq ops take either scale type as they are
    em = Emitter(model, target, layer.weight, layer.dtype, accuracy_level, table=bool(layer.gathers))
    for node, label in zip(layer.nodes, layer.labels):
        if node.op == "Conv":
            rewrite_conv(em, node, rep, label, layer.kernel)
        else:
            (rewrite_gather if node.op == "Gather" else rewrite_node)(em, node, rep, label)
    replaced = {id(node) for node in layer.nodes}
    model.graph.nodes = [n for n in model.graph.nodes if id(n) not in replaced]
    model.spill(em.constants)
    return LoweredLayer(target, em.stored_bytes, em.nodes)


@register_pass
class Lower(Pass):
    """Rewrite planned layers for a target: ``lower(ort)``, ``lower(std)`` or ``lower(lrq)``.

    ``accuracy_level`` (default: the config's) sets the activations' precision for every node: 0
    float, 4 int8 per block. Unset, ort uses 0 for 2/4-bit codes and 4 for 8-bit codes (their only
    fast onnxruntime CPU kernel quantizes activations), lrq uses 4 (for the tables it leaves to
    MatMulNBits too).
    """

    name = "lower"
    positional = ("target",)

    def validate(self) -> None:
        target = self.params.get("target")
        if target is not None and target not in TARGETS:
            raise LrqError(f"unknown lowering target '{target}'; choose one of {', '.join(TARGETS)}")
        if self.params.get("accuracy_level") not in (None, 0, 4):
            raise LrqError(f"accuracy_level must be 0 or 4, got {self.params['accuracy_level']}")
        unknown = sorted(set(self.params) - {"target", "accuracy_level"})
        if unknown:
            raise LrqError(f"unknown option(s) {', '.join(unknown)}; lower takes target and accuracy_level")

    def run(self, ctx: Context) -> PassResult:
        target = self.params.get("target", ctx.config.lowering)
        todo = [(p.layer, p.rep) for p in ctx.plans.values() if p.rep is not None]
        if not todo:
            return PassResult(modified=False)
        own = {p.layer.weight: p.lowering for p in ctx.plans.values() if p.lowering}  # per-layer lowerings
        two_bit = False
        for layer, rep in todo:  # every refusal before the first rewrite (a spilled rep is read one at a time)
            rep = loaded(rep)
            check_layer(layer, rep, own.get(layer.weight, target))
            two_bit |= any(q.bits == 2 and not widened(q) for chain in rep.chains for q in chain)
        if target == "lrq":
            library_path()  # a clear error now if the native ops are missing
        if target == "ort" and two_bit:
            log.warning("asymmetric 2-bit MatMulNBits has no fast onnxruntime CPU kernel at float accuracy: it "
                        "dequantizes the weight on every call (symmetric 2-bit codes run through the 4-bit kernel)")
        std_layers = target == "std" or any(layer.kernel for layer, _ in todo)  # rule 7 is std on every target
        if std_layers:
            upgrade_opset(ctx)
            layers = {layer.weight: layer for layer in ctx.analysis("layers")}
            todo = [(layers[layer.weight], rep) for layer, rep in todo]
        level = self.params.get("accuracy_level", ctx.config.accuracy_level)
        lowered = {}
        for layer, rep in todo:
            lowered[layer.weight] = lower_layer(ctx.model, layer, loaded(rep), own.get(layer.weight, target), level)
        ctx.model.graph.toposort()  # new nodes were appended at the end
        if std_layers:
            ctx.model.min_ir_version = max(ctx.model.min_ir_version, IR_VERSION_INT4)
        ctx.model.set_metadata("lrqgraph.version", __version__)
        ctx.model.set_metadata("lrqgraph.lowering", target)
        ctx.lowered = lowered
        log.info("lower(%s): rewrote %d layers", target, len(lowered))
        return PassResult(modified=True)


def layer_model(rep: Representation, target: str, accuracy_level: int | None, dtype: str = "float32"
                ) -> onnx.ModelProto:
    """y = x[M, K] @ W lowered as ``rep`` for ``target``: one layer, as the latency table times it."""
    k, n = rep.shape
    model = float_model(k, n, dtype)
    config = OptimizeConfig(lowering="ort" if target == FOLD else target, accuracy_level=accuracy_level)
    ctx = Context(ModelState(model), config, original=model)
    quiet = logging.getLogger("lrqgraph")  # the passes' lines about this scratch model are noise
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        PassManager("discover").run(ctx)
        use_plans(ctx, {"W": rep})
        if target == FOLD:
            ctx.plans = {"W": dataclasses.replace(ctx.plans["W"], lowering=FOLD)}
        PassManager("lower,cleanup").run(ctx)
    finally:
        quiet.setLevel(level)
    return ctx.model.to_onnx()


def upgrade_opset(ctx: Context) -> None:
    """Blocked DequantizeLinear needs opset 21: convert older models first (layers are found anew)."""
    if ctx.model.opset >= STD_OPSET:
        return
    old = ctx.model.opset
    try:
        converted = version_converter.convert_version(ctx.model.to_onnx(), STD_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise LrqError(f"cannot convert the model from opset {old} to {STD_OPSET} for the std lowering "
                       f"({str(exc).splitlines()[0]}); use --lowering ort") from None
    state = ModelState(converted, external_dir="/" if ctx.model.streaming else None)
    state.shell, state.min_ir_version = ctx.model.shell, ctx.model.min_ir_version
    state.adopt_spill(ctx.model)
    ctx.model = state
    ctx.invalidate(None)
    log.info("lower(std): converted opset %d -> %d", old, STD_OPSET)
