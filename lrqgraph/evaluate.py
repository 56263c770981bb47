"""Running models in onnxruntime and measuring how far their outputs move.

``open_session`` opens a model (path or ModelProto) in onnxruntime. ``Degradation`` measures the
end-to-end effect of replacing some weights by approximations: the chosen weights become graph
inputs of one session, so each measurement is a run, not a session build. Its metric is taken on
the model's first output: ``cosine`` (1 − mean per-sample cosine of the flattened output) or
``kl`` (mean KL(reference ‖ candidate) of softmax over the last axis, for logits). Both are small,
non-negative and add up approximately over independent small perturbations, which is what the
allocator assumes. ``measure_one`` measures a decoder's KL over the words its reference ranks high
(``_VocabularyCut``): the one-layer measurements of the tolerance step, 2.4-2.9x faster on Gemma 3
270M's 262144-word vocabulary, within 0.7% of the full KL. On large models they also run only the
nodes downstream of the layer (``_Downstream``, lrqgraph.slicing): a layer in the last sixth of a
decoder costs a sixth of a forward pass, with the whole graph's result to rounding.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .errors import LrqError
from .io import save_model, tensor_bytes
from .runtime import session
from .slicing import downstream_slice, with_outputs

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()


def _fallback(speedup: str, reason: object) -> None:
    """A measurement speed-up that cannot serve this model: the full model is measured instead
    (slower, the same numbers). Said once per reason, at warning level: a bug there shows."""
    key = (speedup, f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason))
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s: %s; measuring on the whole model instead (slower, same results)", *key)

METRICS = ("cosine", "kl")
_IN_MEMORY_LIMIT = 1 << 30  # larger models reach onnxruntime through a temporary file


def open_session(model: onnx.ModelProto | str | Path, options=None):
    """An onnxruntime session (lrqgraph.runtime.session) of a path or an in-memory model."""
    if not isinstance(model, onnx.ModelProto):
        return session(str(model), options)
    if tensor_bytes(model) < _IN_MEMORY_LIMIT:
        return session(model.SerializeToString(), options)
    with tempfile.TemporaryDirectory(prefix="lrqgraph-eval-") as tmp:
        return session(save_model(model, Path(tmp) / "model.onnx", external_data=True), options)


def per_sample(x: np.ndarray) -> np.ndarray:
    """[samples, features] float64 view of a batch output (a scalar output is one sample)."""
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    ref, cand = per_sample(reference), per_sample(candidate)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return np.where(norms > 0, (ref * cand).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over all positions of KL(softmax(reference) ‖ softmax(candidate)) along the last axis."""
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(reference), log_softmax(candidate)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


class SoftmaxReference:
    """KL(softmax(reference) ‖ softmax(candidate)) against fixed reference logits, fast: with the
    reference probabilities p and negative entropy Σ p·log p kept (float32 p, float64 sums),
    KL = Σ p·log p − Σ p·z + logsumexp(z) for candidate logits z: two passes over z, no log of it.
    Matches kl_divergence to float32 rounding (a relative 1e-6 of the logit scale)."""

    def __init__(self, logits: np.ndarray):
        z = np.asarray(logits, np.float32)
        top = z.max(axis=-1, keepdims=True)
        p = np.exp(z - top)
        total = p.sum(axis=-1, keepdims=True, dtype=np.float64)
        p /= total.astype(np.float32)
        log_total = np.log(total)[..., 0]
        # Σ p·log p with log p = z − top − log Σ
        self.negentropy = np.einsum("...v,...v->...", p, z, dtype=np.float64) - top[..., 0] - log_total
        self.p = p

    def kl(self, logits: np.ndarray) -> float:
        z = np.asarray(logits, np.float32)
        top = z.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z - top).sum(axis=-1, dtype=np.float64)) + top[..., 0]
        cross = np.einsum("...v,...v->...", self.p, z, dtype=np.float64)
        return float((self.negentropy - cross + lse).mean())


def _detach_constants(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Turn the constant tensors ``names`` (initializers, or outputs of Constant / Identity /
    Transpose / Cast chains over constants) into graph inputs of ``model``, in place; returns their values."""
    graph = model.graph
    wanted = set(names)
    values: dict[str, np.ndarray] = {}
    missing = wanted - {init.name for init in graph.initializer}
    probe = onnx.ModelProto()
    if missing:  # node-produced constants, which may read the initializers detached below
        probe.CopyFrom(model)
    kept = []
    for init in graph.initializer:
        if init.name in wanted:
            values[init.name] = onnx.numpy_helper.to_array(init)
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if missing:  # evaluate them once, then cut their producers off
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_value_info(n, onnx.TypeProto()) for n in sorted(missing))
        needed = _producers(probe.graph, missing)  # not the rest of the graph, which the placeholders may not fit
        del probe.graph.node[:]
        probe.graph.node.extend(needed)
        outs = open_session(probe).run(sorted(missing), {i.name: _zeros(i) for i in probe.graph.input
                                                         if i.name not in {t.name for t in probe.graph.initializer}})
        values.update(zip(sorted(missing), outs))
        nodes = [n for n in graph.node if not set(n.output) & missing]
        del graph.node[:]
        graph.node.extend(nodes)
    listed = {i.name for i in graph.input}
    for name in names:
        if name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype), values[name].shape))
    return values


def _producers(graph: onnx.GraphProto, names: set[str]) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` that the tensors ``names`` depend on, in graph order."""
    wanted, chosen = set(names), set()
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if wanted & set(node.output):
            chosen.add(i)
            wanted.update(node.input)
    return [graph.node[i] for i in sorted(chosen)]


def _transposed_sources(model: onnx.ModelProto, names: set[str]) -> dict[str, str]:
    """{initializer: weight} for weights ``names`` that are a Transpose of an initializer: a table
    stored as its tied lm_head's [hidden, vocab] weight and read by the Gather through a Transpose
    (onnxruntime-genai's builder). The initializer is detached too, as the weight's transposed
    alias, so that a replaced weight reaches the lm_head as well (and no slice keeps a copy)."""
    initializers = {t.name for t in model.graph.initializer}
    sources = {}
    for node in model.graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type == "Transpose" and node.output[0] in names and node.input[0] in initializers \
                and perm == [1, 0]:
            sources[node.input[0]] = node.output[0]
    return sources


def _detach_transposes(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> dict[str, str]:
    """Transposes of detached 2-D inputs (a tied lm_head reading the embedding table as Eᵀ) become
    inputs of their own, fed the transposed array: onnxruntime would otherwise transpose the table on
    every run. In place; returns {transposed input: the input it is the transpose of}."""
    graph = model.graph
    aliases: dict[str, str] = {}
    kept = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Transpose" and node.input else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if source in values and values[source].ndim == 2 and perm == [1, 0]:
            aliases[node.output[0]] = source
            values[node.output[0]] = np.ascontiguousarray(values[source].T)
            graph.input.append(onnx.helper.make_tensor_value_info(
                node.output[0], onnx.helper.np_dtype_to_tensor_dtype(values[source].dtype), values[source].shape[::-1]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return aliases


def _zeros(value: onnx.ValueInfoProto) -> np.ndarray:
    """A placeholder feed for an input constants do not depend on (shape dims of 1)."""
    t = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    return np.zeros([d.dim_value or 1 for d in t.shape.dim], dtype)


class Degradation:
    """End-to-end effect of replacing chosen weights, on fixed inputs, in one onnxruntime session."""

    def __init__(self, model: onnx.ModelProto, weights: Sequence[str], batches: Sequence[dict[str, np.ndarray]],
                 metric: str = "cosine", custom: Callable[[list, list], float] | None = None):
        if metric not in METRICS and custom is None:
            raise LrqError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
        self.metric, self.custom = ("custom" if custom is not None else metric), custom
        self.batches = list(batches)
        if not self.batches:
            raise LrqError("measuring degradation needs at least one input batch")
        graph_model = onnx.ModelProto()
        graph_model.CopyFrom(model)
        sources = _transposed_sources(graph_model, set(weights))
        self.weights = _detach_constants(graph_model, [*weights, *sources])
        self.aliases = {**_detach_transposes(graph_model, self.weights), **sources}
        self.session = open_session(graph_model)
        self.output = self.session.get_outputs()[0].name
        self.reference = self.outputs({})
        self._cut: _VocabularyCut | None = None
        self._downstream: _Downstream | None = None
        first = [r[0] for r in self.reference]
        if self.metric == "kl":  # keep what each KL needs of the reference logits, not the logits
            self._softmax = [SoftmaxReference(z) for z in first]
            self._cut = _VocabularyCut.of(graph_model, self, first)
        held = sum(v.nbytes for name, v in self.weights.items() if name not in self.aliases)
        if self.custom is None and held >= _Downstream.MIN_BYTES:
            if self._cut is not None:  # the one-layer runs go through the cut: slice that
                self._cut.downstream = _Downstream.of(self._cut.model, self, self._cut.feeds(self, {}),
                                                      [z[..., self._cut.words] for z in first])
            else:
                self._downstream = _Downstream.of(graph_model, self, self.feeds({}), first)
        if self.metric == "kl":
            self.reference = None

    def feeds(self, replaced: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each batch's feed with ``replaced`` weights (and their transposed aliases) and all others as in the model."""
        weights = {**self.weights, **{k: v.astype(self.weights[k].dtype, copy=False) for k, v in replaced.items()}}
        weights.update({alias: np.ascontiguousarray(weights[source].T) for alias, source in self.aliases.items()
                        if source in replaced})
        return [{**feed, **weights} for feed in self.batches]

    def outputs(self, replaced: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Every batch's outputs (only the first output unless a custom metric reads them all:
        a decoder's logits for every output would multiply the memory)."""
        names = None if self.custom is not None else [self.output]
        return [self.session.run(names, feed) for feed in self.feeds(replaced)]

    def measure_one(self, replaced: dict[str, np.ndarray]) -> float:
        """``measure`` for ranking one layer's perturbations: on KL, over the words the reference
        ranks high (``_VocabularyCut``) where the graph allows, its scale the full KL's; on a large
        model, through the nodes downstream of the layer only (``_Downstream``)."""
        if self._cut is not None:
            return self._cut.measure(self, replaced)
        if self._downstream is not None:
            outputs = self._downstream.run(replaced, self.feeds(replaced))
            if outputs is not None:
                return self._metric([[o] for o in outputs])
        return self.measure(replaced)

    def measure(self, replaced: dict[str, np.ndarray]) -> float:
        """The metric with ``replaced`` weights (name -> array) and all others as in the model."""
        return self._metric(self.outputs(replaced))

    def _metric(self, outputs: list[list[np.ndarray]]) -> float:
        if self.custom is not None:
            return float(self.custom(self.reference, outputs))
        if self.metric == "kl":
            return float(np.mean([ref.kl(c[0]) for ref, c in zip(self._softmax, outputs)]))
        cos = np.concatenate([cosines(r[0], c[0]) for r, c in zip(self.reference, outputs)])
        return float(1.0 - cos.mean())


class _VocabularyCut:
    """One-layer KL measurements of a decoder over the words the reference ranks in its top
    ``TOP`` at some position, with the lm_head's weight fed as those columns only: the lm_head of
    a 262144-word vocabulary is most of a forward pass, and a perturbation's KL lives where the
    reference puts its mass. Both softmaxes are renormalized over the cut; the result is scaled
    by the ratio of full to cut KL measured once (a probe of every weight at 1% noise), so
    predictions and full measurements share a scale. Only where the logits come from one MatMul
    of a detached [K, V] weight; otherwise (or if the cut session disagrees with the full one)
    measurements stay full."""

    TOP = 32
    MIN_VOCABULARY = 8192  # below this the lm_head is not worth a second session
    # of the reference's probability, on average over positions, or the cut is not representative
    # (Gemma 3 270M on KJV: 0.974, the least 0.75 at one position; its KL still within 0.7%)
    MIN_MASS = 0.9

    def __init__(self, model: onnx.ModelProto, session, weight: str, words: np.ndarray,
                 softmax: list[SoftmaxReference], scale: float):
        self.model, self.session, self.weight, self.words = model, session, weight, words
        self.softmax, self.scale = softmax, scale
        self.downstream: _Downstream | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto, meter: "Degradation", logits: list[np.ndarray]) -> "_VocabularyCut | None":
        vocabulary = logits[0].shape[-1]
        head = _lm_head_input(model, meter, vocabulary)
        if head is None or vocabulary < cls.MIN_VOCABULARY:
            return None
        top = np.concatenate([np.argpartition(z.reshape(-1, vocabulary), -cls.TOP, axis=-1)[:, -cls.TOP:].ravel()
                              for z in logits])
        words = np.unique(top)
        covered = float(np.mean([ref.p[..., words].sum(axis=-1).mean() for ref in meter._softmax]))
        if len(words) * 4 > vocabulary or covered < cls.MIN_MASS:
            log.debug("vocabulary cut: %d words hold %.3f of the mass on average: measuring in full",
                      len(words), covered)
            return None
        cut = onnx.ModelProto()
        cut.CopyFrom(model)
        del cut.graph.value_info[:]
        for value in (*cut.graph.input, *cut.graph.output):
            if value.name == head or value.name == meter.output:
                value.type.tensor_type.shape.dim[-1].dim_param = "lrqgraph_words"
        try:
            session = open_session(cut)
            made = cls(cut, session, head, words, [SoftmaxReference(z[..., words]) for z in logits], 1.0)
            got = made._logits(meter, {})
        except Exception as exc:  # noqa: BLE001 - a graph the cut does not fit: measure in full
            _fallback("vocabulary cut", exc)
            return None
        if not all(np.allclose(g, z[..., words], rtol=1e-4, atol=1e-4 * float(np.abs(z).max()))
                   for g, z in zip(got, logits)):
            _fallback("vocabulary cut", "the cut model's logits differ from the full model's")
            return None
        # the scale: full over cut KL for one small perturbation of every weight (a transposed alias
        # follows its table, as in every measurement): 1% of its spread times a seeded pattern of
        # 2^20 normal draws laid over it, so a 262144-word table costs a copy, not 10^8 draws
        pattern = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
        noisy = {name: w + (0.01 * float(np.std(w.ravel()[::7])) * np.resize(pattern, w.shape)).astype(w.dtype)
                 for name, w in meter.weights.items() if name not in meter.aliases}
        full, part = meter.measure(noisy), made._kl(meter, noisy)
        made.scale = full / part if full > 0 and part > 0 else 1.0
        log.info("vocabulary cut: one-layer KL over %d of %d words (%.3f of the mass on average), "
                 "scale %.3f", len(words), vocabulary, covered, made.scale)
        return made

    def feeds(self, meter: "Degradation", replaced: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """``Degradation.feeds`` with the lm_head's weight cut to the words."""
        weights = {**meter.weights, **{k: v.astype(meter.weights[k].dtype, copy=False) for k, v in replaced.items()}}
        source = meter.aliases.get(self.weight)
        for alias, of in meter.aliases.items():
            if of in replaced and alias != self.weight:
                weights[alias] = np.ascontiguousarray(weights[of].T)
        head = weights[source][self.words].T if source in replaced else weights[self.weight][:, self.words]
        weights[self.weight] = np.ascontiguousarray(head)
        return [{**feed, **weights} for feed in meter.batches]

    def _logits(self, meter: "Degradation", replaced: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = self.feeds(meter, replaced)
        if self.downstream is not None:
            got = self.downstream.run(replaced, feeds)
            if got is not None:
                return got
        return [self.session.run([meter.output], feed)[0] for feed in feeds]

    def _kl(self, meter: "Degradation", replaced: dict[str, np.ndarray]) -> float:
        return float(np.mean([ref.kl(z) for ref, z in zip(self.softmax, self._logits(meter, replaced))]))

    def measure(self, meter: "Degradation", replaced: dict[str, np.ndarray]) -> float:
        return self.scale * self._kl(meter, replaced)


def _lm_head_input(model: onnx.ModelProto, meter: "Degradation", vocabulary: int) -> str | None:
    """The detached [K, V] input a MatMul multiplies by to make the first output, if that is all it does."""
    producer = next((n for n in model.graph.node if meter.output in n.output), None)
    if producer is None or producer.op_type != "MatMul":
        return None
    weight = meter.weights.get(producer.input[1])  # a tied lm_head's transposed table is there too
    return producer.input[1] if weight is not None and weight.ndim == 2 and weight.shape[1] == vocabulary else None


class _Downstream:
    """One-layer measurements through the nodes the layer reaches only (lrqgraph.slicing): the
    measured weights, in graph order, fall into ``GROUPS`` runs of consecutive layers; every run
    but the first gets a session over the nodes its weights reach, fed the boundary's values
    (tensors upstream of the run, unchanged by its weights) from one run of the whole model. A
    layer deep in a decoder then costs the layers after it, not a whole forward pass. A run whose
    slice does not reproduce the reference outputs (or that has none) is measured in full. Only
    for models whose measured weights hold ``MIN_BYTES``: below that, the sessions cost more than
    they save."""

    GROUPS = 6
    MIN_BYTES = 256 << 20

    def __init__(self, groups: dict[str, int], sessions: dict[int, tuple], output: str):
        self.groups, self.sessions, self.output = groups, sessions, output

    @classmethod
    def of(cls, model: onnx.ModelProto, meter: "Degradation", feeds: list[dict[str, np.ndarray]],
           reference: list[np.ndarray]) -> "_Downstream | None":
        position = {}
        for index, node in enumerate(model.graph.node):
            for name in node.input:
                position.setdefault(name, index)
        readers = {w: min([position.get(w, len(position))]
                          + [position.get(a, len(position)) for a, s in meter.aliases.items() if s == w])
                   for w in meter.weights if w not in meter.aliases}
        ordered = sorted(readers, key=lambda w: (readers[w], w))
        runs = [list(r) for r in np.array_split(np.array(ordered, dtype=object), min(cls.GROUPS, len(ordered)))]
        groups, slices = {}, {}
        for g, members in enumerate(runs):
            groups.update((w, g) for w in members)
            if g == 0:
                continue  # the first run reaches (nearly) everything: the whole model serves it
            changed = set(members) | {a for a, s in meter.aliases.items() if s in members}
            cut = downstream_slice(model, changed, meter.output)
            if cut is not None:
                slices[g] = cut
        if not slices:
            return None
        boundary = sorted({name for cut in slices.values() for name in cut.boundary})
        values = []
        if boundary:
            tap = open_session(with_outputs(model, boundary))
            values = [dict(zip(boundary, tap.run(boundary, feed))) for feed in feeds]
            del tap
        sessions = {}
        for g, cut in slices.items():
            try:
                sess = open_session(cut.typed(values[0] if values else {}))
            except Exception as exc:  # noqa: BLE001 - a slice onnxruntime refuses: measure in full
                _fallback("downstream slice", exc)
                continue
            names = [i.name for i in sess.get_inputs()]
            made = (sess, names, [{n: v[n] for n in cut.boundary} for v in values] if values else [{} for _ in feeds])
            got = cls._run(made, feeds, meter.output)
            if all(np.allclose(a, z, rtol=1e-4, atol=1e-4 * float(np.abs(z).max())) for a, z in zip(got, reference)):
                sessions[g] = made
            else:
                _fallback("downstream slice", "a slice's output differs from the full model's")
        if not sessions:
            return None
        log.info("downstream slices: one-layer measurements of %d of %d weights run part of the graph (%s nodes "
                 "of %d)", sum(g in sessions for g in groups.values()), len(groups),
                 ", ".join(str(slices[g].nodes) for g in sorted(sessions)), len(model.graph.node))
        return cls(groups, sessions, meter.output)

    @staticmethod
    def _run(made: tuple, feeds: list[dict[str, np.ndarray]], output: str) -> list[np.ndarray]:
        sess, names, boundary = made
        return [sess.run([output], {**{n: feed[n] for n in names if n in feed}, **edge})[0]
                for feed, edge in zip(feeds, boundary)]

    def run(self, replaced: dict[str, np.ndarray], feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray] | None:
        """The first output per batch through the slice of the replaced weights' run, or None
        (weights of several runs, or a run without a slice)."""
        runs = {self.groups.get(w) for w in replaced}
        if len(runs) != 1 or next(iter(runs)) not in self.sessions:
            return None
        return self._run(self.sessions[next(iter(runs))], feeds, self.output)
