"""The schema of lrqgraph's custom ops (domain ``lrq``): inputs in order, with their types and
whether they are required, and the integer attributes each kernel reads.

This is the Python copy of the tables in runtime/native/lrq_ops.cc (``kInputs``, ``kAttributes``,
``kOptionalAttributes``); tests/test_op_schema.py checks it against the text the built library
describes itself with (``LrqOpSchema()``), so the two cannot drift apart. Pure Python: the
lowerings build nodes from it and read them back by it.
"""
from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "lrq"

FLOAT, FLOAT16, UINT8 = "float", "float16", "uint8"  # ONNX tensor element type names
SCALES = (FLOAT, FLOAT16)  # declared UNDEFINED to onnxruntime; the kernels take float or float16


@dataclass(frozen=True)
class OpInput:
    name: str
    types: tuple[str, ...]  # the element types the kernel accepts
    required: bool


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[OpInput, ...]
    attributes: tuple[str, ...]                 # integer attributes every node must have
    optional_attributes: tuple[str, ...] = ()   # read when present (or, for q_*, when Q is given)

    def index(self, input_name: str) -> int:
        """The position of input ``input_name`` among the node's inputs."""
        for i, op_input in enumerate(self.inputs):
            if op_input.name == input_name:
                return i
        raise ValueError(f"{DOMAIN}.{self.name} has no input {input_name!r}; its inputs are "
                         f"{', '.join(i.name for i in self.inputs)}")


def _weight(prefix: str, required: bool) -> tuple[OpInput, ...]:
    """codes, scales, zero points of one block-quantized weight (zero points are always optional)."""
    return (OpInput(f"{prefix}_codes", (UINT8,), required), OpInput(f"{prefix}_scales", SCALES, required),
            OpInput(f"{prefix}_zero_points", (UINT8,), False))


X = OpInput("X", (FLOAT,), True)
BIAS = OpInput("bias", (FLOAT,), False)
# X·F first: a randomized Hadamard transform of the input (lrqgraph.numerics.rotation), by its signs
# [K] and, when K = 2^a·b with b > 1, its small orthogonal block [b, b]
ROTATION = (OpInput("rotation_signs", SCALES, False), OpInput("rotation_small", SCALES, False))

QMATMUL = OpSchema("QMatMul", (X, *_weight("B", True), BIAS, *ROTATION),
                   ("K", "N", "bits", "block_size"), ("accuracy_level", "rotation_seed"))
QLOWRANK = OpSchema("QLowRankMatMul", (X, *_weight("L", True), *_weight("R", True), *_weight("Q", False), BIAS,
                                       *ROTATION),
                    ("K", "N", "rank", "l_bits", "l_block_size", "r_bits", "r_block_size"),
                    ("q_bits", "q_block_size", "accuracy_level", "rotation_seed"))
KASHIN = OpSchema("KashinMatMul",
                  (X, OpInput("codes", (UINT8,), True), OpInput("codebook", (FLOAT,), True),
                   OpInput("row_signs", (FLOAT,), False), OpInput("row_small", (FLOAT,), False),
                   OpInput("col_signs", (FLOAT,), False), OpInput("col_small", (FLOAT,), False), BIAS),
                  ("K", "N", "bits"))

OPS: dict[str, OpSchema] = {op.name: op for op in (QMATMUL, QLOWRANK, KASHIN)}
