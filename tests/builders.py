"""Tiny hand-built ONNX graphs for pass tests (random weights: structure only, never quality)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.31 refuses onnx 1.23's default IR version 14


def weight(k: int, n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(dtype)


def model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = IR_VERSION
    return m


def io(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def matmul_model(k: int = 128, n: int = 64, batch_dims=("b",), seed: int = 0, dtype=np.float32,
                 opset: int = 17) -> onnx.ModelProto:
    """x[..., K] @ W[K, N] -> Relu -> y (the Relu keeps the MatMul off the graph output)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return model(nodes, [io("x", [*batch_dims, k], elem)], [io("y", [*batch_dims, n], elem)],
                 {"W": weight(k, n, seed, dtype)}, opset)


def gemm_model(k: int = 128, n: int = 64, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0,
               bias: str | None = "vector", seed: int = 0) -> onnx.ModelProto:
    """Gemm(x[M, K], B, C) -> Relu; B is [N, K] when transB=1; C a [N] vector, [M, N] input, or none."""
    w = weight(k, n, seed)
    inits = {"B": np.ascontiguousarray(w.T) if trans_b else w}
    inputs = [io("x", ["m", k])]
    gemm_inputs = ["x", "B"]
    if bias == "vector":
        inits["C"] = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
        gemm_inputs.append("C")
    elif bias == "input":
        inputs.append(io("c", ["m", n]))
        gemm_inputs.append("c")
    nodes = [helper.make_node("Gemm", gemm_inputs, ["h"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return model(nodes, inputs, [io("y", ["m", n])], inits)


def shared_weight_model(k: int = 96, n: int = 96) -> onnx.ModelProto:
    """Two MatMuls read the same weight: y = relu(x@W) @ W."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "W"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["y"], name="relu2")]
    return model(nodes, [io("x", ["b", k])], [io("y", ["b", n])], {"W": weight(k, n)})


def tied_weight_model(dim: int = 64) -> onnx.ModelProto:
    """An embedding Gather and a MatMul read the same square table (tied weights)."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "E"], ["h"], name="tied_mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return model(nodes, [io("ids", ["b"], TensorProto.INT64)], [io("y", ["b", dim])], {"E": weight(dim, dim)})


def tied_lm_head_model(vocab: int = 96, dim: int = 64, gemm: bool = False, dtype=np.float32,
                       hidden: int = 0) -> onnx.ModelProto:
    """ids -> Gather(E) -> Tanh -> ``hidden`` x (MatMul dim x dim -> Tanh) -> lm_head reading the
    same E[vocab, dim] as Eᵀ (MatMul through a Transpose as torch's exporter writes it, or Gemm
    transB=1) -> logits: a decoder's tied embedding."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    last = f"h{hidden}"
    head = ([helper.make_node("Gemm", [last, "E"], ["logits"], name="lm_head", transB=1)] if gemm else
            [helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", [last, "Et"], ["logits"], name="lm_head")])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("Tanh", ["e"], ["h0"], name="tanh")]
    inits = {"E": (weight(vocab, dim) * 0.5).astype(dtype)}
    rng = np.random.default_rng(1)
    for i in range(hidden):
        inits[f"W{i}"] = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(dtype)
        nodes += [helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"], name=f"tanh{i}")]
    ids = ["b"] if gemm else ["b", "s"]
    return model(nodes + head, [io("ids", ids, TensorProto.INT64)], [io("logits", ids + [vocab], elem)], inits)


def activation_matmul_model(k: int = 32) -> onnx.ModelProto:
    """x @ xᵀ-like product of two activations: nothing to rewrite."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "xt"], ["h"], name="act_mm"),
             helper.make_node("Relu", ["h"], ["y"])]
    return model(nodes, [io("x", ["b", k])], [io("y", ["b", "b"])], {})


def mlp_model(dims=(64, 128, 128, 48), seed: int = 0) -> onnx.ModelProto:
    """x -> (MatMul -> Tanh) per layer -> y: several layers with different sensitivities."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], {}, "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        inits[f"W{i}"] = (rng.standard_normal((k, n)) * (1.5 ** i) / np.sqrt(k)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"act{i}")]
        prev = f"a{i}"
    nodes[-1].output[0] = "y"
    return model(nodes, [io("x", ["b", dims[0]])], [io("y", ["b", dims[-1]])], inits)


def token_model(vocab: int = 50, dim: int = 64) -> onnx.ModelProto:
    """input_ids, attention_mask -> embedding Gather -> MatMul -> Relu (a text model's interface)."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], name="embed"),
             helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="unsq"),
             helper.make_node("Mul", ["e", "m3"], ["em"], name="mask"),
             helper.make_node("MatMul", ["em", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return model(nodes, [io("input_ids", ["b", "s"], TensorProto.INT64), io("attention_mask", ["b", "s"], TensorProto.INT64)],
                 [io("y", ["b", "s", dim])],
                 {"E": weight(vocab, dim), "W": weight(dim, dim, 1), "axes": np.array([-1], np.int64)})


def entry(ctx, name: str) -> dict:
    """The report entry of layer ``name`` as the run's report would give it."""
    from lrqgraph.report import layer_entries
    return {e["name"]: e for e in layer_entries(ctx)}[name]


def lowered_both_ways(model_path, factorize, folder, lowerings=("ort", "lrq")) -> dict:
    """One factorization of the model's layers, lowered to each target: {lowering: saved path}."""
    import lrqgraph
    from lrqgraph import OptimizeConfig
    from lrqgraph.model import ModelState
    from lrqgraph.passmanager import Context, PassManager
    from lrqgraph.plan import use_plans

    proto = onnx.load(str(model_path))
    ctx = Context(ModelState(proto), OptimizeConfig(factorize=factorize), original=proto)
    PassManager("discover,factorize").run(ctx)
    plans = {w: p.rep for w, p in ctx.plans.items() if p.rep is not None}
    paths = {}
    for lowering in lowerings:
        ctx = Context(ModelState(proto), OptimizeConfig(factorize=factorize, lowering=lowering), original=proto)
        PassManager("discover").run(ctx)
        use_plans(ctx, plans)
        PassManager(f"lower({lowering}),cleanup").run(ctx)
        paths[lowering] = folder / f"{lowering}.onnx"
        lrqgraph.save_model(ctx.model.to_onnx(), paths[lowering], external_data=True)
    return paths


def conv_model(c_in: int = 8, c_out: int = 16, kernel=(3, 3), bias: bool = True, group: int = 1, seed: int = 0,
               size=(12, 12), opset: int = 17, **attrs) -> onnx.ModelProto:
    """x[N, c_in, H, W] -> Conv (weight W, optional bias B, ``attrs``: strides, pads, dilations,
    auto_pad) -> Relu -> y."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((c_out, c_in // group, *kernel)) / np.sqrt(c_in * np.prod(kernel))).astype(np.float32)
    inits = {"W": w}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(c_out).astype(np.float32) * 0.1
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["h"], name="conv", group=group, **attrs),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return model(nodes, [io("x", ["n", c_in, *size])], [io("y", ["n", c_out, "h_out", "w_out"])], inits, opset)


def small_cnn_model(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """x[N, 3, 16, 16] -> Conv 3x3 s2 (3->16) -> Relu -> Conv 3x3 SAME (16->32) -> Relu -> depthwise
    Conv 5x5 SAME (32) -> Relu -> Conv 1x1 (32->32) -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    (classifier) -> logits."""
    rng = np.random.default_rng(seed)

    def kernel(c_out, c_in, k):
        return (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2 / (c_in * k * k))).astype(np.float32)
    inits = {"W0": kernel(16, 3, 3), "B0": np.zeros(16, np.float32), "W1": kernel(32, 16, 3),
             "Wd": kernel(32, 1, 5), "W2": kernel(32, 32, 1), "B2": rng.standard_normal(32).astype(np.float32) * 0.1,
             "Wc": (rng.standard_normal((classes, 32)) / np.sqrt(32)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], name="conv0", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "W1"], ["c1"], name="conv1", auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "Wd"], ["d"], name="depthwise", group=32, auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["d"], ["rd"]),
             helper.make_node("Conv", ["rd", "W2", "B2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "Wc"], ["logits"], name="classifier", transB=1)]
    return model(nodes, [io("x", ["n", 3, 16, 16])], [io("logits", ["n", classes])], inits)
