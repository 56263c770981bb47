"""Running a model block by block, for models that should not be loaded whole.

The graph's nodes (in their topological order) are cut into consecutive blocks holding at most
``max_bytes`` of weights each (a node whose own weights are larger gets a block of its own). Each
block is a model of its own: its inputs are the graph inputs and earlier blocks' tensors it reads,
its outputs the tensors later blocks or the graph's outputs read. One onnxruntime session at a
time holds one block's weights (read from their files, lrqgraph.external); every sample goes
through a block before the next block is opened, and a tensor is dropped after its last reader.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from . import external
from .slicing import has_subgraphs

log = logging.getLogger(__name__)

# Weight bytes per block: a session over one block holds them about three times while it is made
BLOCK_BYTES = 256 << 20


@dataclass(frozen=True)
class Block:
    nodes: tuple[int, ...]     # indices into graph.node
    inputs: tuple[str, ...]    # graph inputs and earlier blocks' tensors it reads
    outputs: tuple[str, ...]   # tensors of its own that later blocks or the graph's outputs read
    initializers: tuple[str, ...]
    weight_bytes: int


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return external.external_range(t)[2] if external.is_external(t) else len(t.raw_data) or t.ByteSize()


def split_blocks(model: onnx.ModelProto, max_bytes: int | None = None) -> list[Block]:
    """The blocks of ``model`` with at most ``max_bytes`` (default BLOCK_BYTES) of weights each
    (one block for a graph with If/Loop bodies: they read outer names)."""
    max_bytes = BLOCK_BYTES if max_bytes is None else max_bytes
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ranges: list[list[int]] = [[]]
    if has_subgraphs(graph):
        ranges = [list(range(len(graph.node)))]
    else:
        size, seen = 0, set()
        for i, node in enumerate(graph.node):
            new = [n for n in node.input if n in inits and n not in seen]
            cost = sum(_tensor_bytes(inits[n]) for n in new)
            if ranges[-1] and size + cost > max_bytes:
                ranges.append([])
                size, seen = 0, set()
                new = [n for n in node.input if n in inits]
                cost = sum(_tensor_bytes(inits[n]) for n in new)
            ranges[-1].append(i)
            seen.update(new)
            size += cost
    last_read: dict[str, int] = {}
    for b, members in enumerate(ranges):
        for i in members:
            for name in graph.node[i].input:
                last_read[name] = b
    graph_outputs = {o.name for o in graph.output}
    blocks = []
    for b, members in enumerate(ranges):
        produced = [o for i in members for o in graph.node[i].output if o]
        own = set(produced)
        reads = list(dict.fromkeys(n for i in members for n in graph.node[i].input if n and n not in own))
        weights = tuple(n for n in reads if n in inits)
        outputs = tuple(o for o in produced if o in graph_outputs or last_read.get(o, -1) > b)
        blocks.append(Block(tuple(members), tuple(n for n in reads if n not in inits), outputs, weights,
                            sum(_tensor_bytes(inits[n]) for n in weights)))
    return blocks


def block_model(model: onnx.ModelProto, block: Block, values: dict[str, np.ndarray],
                folder: "DataFolder | None" = None, outputs: list[str] | None = None) -> onnx.ModelProto:
    """The block as a model computing ``outputs`` (default: the block's), its inputs typed as
    ``values`` hold them; its external weights named relative to ``folder`` where it reaches
    their files, inside the model otherwise."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    typed = {v.name: v for v in [*graph.input, *graph.output]}

    def value_info(name: str) -> onnx.ValueInfoProto:
        if name in typed:
            return typed[name]
        if name in values:
            array = values[name]
            return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                                      [None] * array.ndim)
        return onnx.helper.make_value_info(name, onnx.TypeProto())

    def weight(name: str) -> onnx.TensorProto:
        tensor = inits[name]
        relative = folder.relative(tensor) if folder is not None else None
        return relative if relative is not None else external.inline(tensor)

    sub = onnx.helper.make_graph([graph.node[i] for i in block.nodes], f"{graph.name}_block",
                                 [value_info(n) for n in block.inputs],
                                 [value_info(n) for n in (block.outputs if outputs is None else outputs)],
                                 [weight(n) for n in block.initializers])
    made = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    made.functions.extend(model.functions)
    return made


class DataFolder:
    """One folder onnxruntime may read every data file of a model from: the files' own folder when
    they share one, else a temporary folder of hard links to them (onnxruntime refuses absolute
    locations and symbolic links out of the folder). Files it cannot link are read into the model."""

    def __init__(self, model: onnx.ModelProto):
        files = sorted({external.external_range(t)[0] for t in model.graph.initializer if external.is_external(t)})
        self._names: dict[str, str] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        folders = {str(Path(f).parent) for f in files}
        if len(folders) == 1:
            self.path = folders.pop()
            self._names = {f: Path(f).name for f in files}
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="lrqgraph-blocks-")
        self.path = self._tmp.name
        for i, f in enumerate(files):
            link = f"{i}_{Path(f).name}"
            try:
                os.link(f, Path(self.path) / link)
                self._names[f] = link
            except OSError:
                log.info("blocks: cannot hard-link %s into %s; its tensors are read into each block", f, self.path)

    def relative(self, tensor: onnx.TensorProto) -> onnx.TensorProto | None:
        if not external.is_external(tensor):
            return tensor
        path, offset, length = external.external_range(tensor)
        name = self._names.get(path)
        if name is None:
            return None
        return external.reference(tensor.name, tensor, name, offset, length)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _block_session(model: onnx.ModelProto, folder: DataFolder):
    from .runtime import session, session_options
    config = {"session.model_external_initializers_file_folder_path": folder.path}
    # Prepacking copies weights (a float MatMul's beside its memory-mapped file pages): off for
    # blocks of float ops, which run a handful of samples once, and on for quantized ones
    # (MatMulNBits, which onnxruntime also makes of DequantizeLinear + MatMul, dequantizes its
    # weight on every call without it: 4x slower verification)
    if all(n.domain in ("", "ai.onnx") and n.op_type != "DequantizeLinear" for n in model.graph.node):
        config["session.disable_prepacking"] = "1"
    options = session_options(config=config)
    return session(model.SerializeToString(), options)


def run_blocks(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], max_bytes: int | None = None,
               what: str = "model", taps: Iterable[str] = (),
               on_tap: Callable[[int, str, np.ndarray], None] | None = None,
               on_block: Callable[[list[str]], None] | None = None) -> list[dict[str, np.ndarray]]:
    """The graph outputs for each feed, computed block by block (see the module doc).

    ``taps``: tensors handed to ``on_tap(feed index, name, value)`` as soon as they are computed
    (graph inputs first); ``on_block(names)`` follows each block with the taps it computed, once
    every feed went through it (calibration statistics are then complete for those tensors)."""
    blocks = split_blocks(model, max_bytes)
    envs = [dict(feed) for feed in feeds]
    needed_after = _needed_after(blocks, {o.name for o in model.graph.output})
    taps = set(taps)
    given = sorted(taps & {i.name for i in model.graph.input})
    for i, env in enumerate(envs):
        for name in given:
            on_tap(i, name, env[name])
    if given and on_block is not None:
        on_block(given)
    folder = DataFolder(model)
    try:
        _run(model, blocks, envs, needed_after, folder, what, taps, on_tap, on_block)
    finally:
        folder.close()
    return envs


def _run(model, blocks, envs, needed_after, folder, what, taps, on_tap, on_block) -> None:
    start = time.perf_counter()
    for b, block in enumerate(blocks):
        tapped = [o for i in block.nodes for o in model.graph.node[i].output if o in taps]
        wanted = list(dict.fromkeys([*block.outputs, *tapped]))
        session = _block_session(block_model(model, block, envs[0] if envs else {}, folder, wanted), folder)
        for i, env in enumerate(envs):
            got = dict(zip(wanted, session.run(wanted, {n: env[n] for n in block.inputs})))
            for name in tapped:
                on_tap(i, name, got[name])
            env.update((name, got[name]) for name in block.outputs)
            for name in [n for n in env if n not in needed_after[b]]:
                del env[name]
        del session
        if tapped and on_block is not None:
            on_block(tapped)
        if (b + 1) % 8 == 0 or b + 1 == len(blocks):
            spent = time.perf_counter() - start
            log.info("%s: block %d/%d run, %.1f s spent, ~%.1f s left", what, b + 1, len(blocks), spent,
                     spent / (b + 1) * (len(blocks) - b - 1))


def _needed_after(blocks: list[Block], graph_outputs: set[str]) -> list[set[str]]:
    """Per block: the tensors some later block or the graph's outputs still read once it has run."""
    needed: list[set[str]] = []
    later = set(graph_outputs)
    for block in reversed(blocks):
        needed.append(set(later))
        later |= set(block.inputs)
    return needed[::-1]
