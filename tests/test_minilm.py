"""Real model: all-MiniLM-L6-v2 exported to ONNX (cached), optimized with both lowerings, judged by
sentence-embedding cosine against fp32 on 100 real sentences (KJV verses)."""
import numpy as np
import onnx
import pytest

import lrqgraph
from lrqgraph import OptimizeConfig
from lrqgraph.io import tensor_bytes

minilm = pytest.importorskip("lrqgraph.testing.minilm", reason="needs the examples extra")
from lrqgraph.testing import data  # noqa: E402

pytestmark = pytest.mark.real

# Measured on these 100 verses with the defaults (rtn, 4-bit, block 32, symmetric, MSE clipping):
# cosine mean 0.9693, min 0.9596, identical for both lowerings. onnxruntime's own MatMulNBits
# quantizer (4-bit, block 32, symmetric) measures 0.9655 mean on 200 verses. The thresholds sit
# just under our measurement: a regression in packing, scales or graph wiring drops far below.
MIN_COSINE_MEAN = 0.965
MIN_COSINE_MIN = 0.95


@pytest.fixture(scope="module")
def fp32_path():
    return minilm.onnx_path()


@pytest.fixture(scope="module")
def sentences():
    return data.kjv_sentences(100, start=0)


@pytest.fixture(scope="module")
def reference(fp32_path, sentences):
    return minilm.embed(str(fp32_path), sentences)


@pytest.fixture(scope="module", params=["ort", "std"])
def optimized(request, fp32_path, tmp_path_factory):
    result = lrqgraph.run(fp32_path, OptimizeConfig(lowering=request.param))
    path = tmp_path_factory.mktemp("minilm") / f"minilm.{request.param}.onnx"
    lrqgraph.save_model(result.model, path)
    return request.param, path, result.report


def test_optimized_minilm_is_valid_smaller_and_close(optimized, fp32_path, sentences, reference):
    lowering, path, report = optimized
    onnx.checker.check_model(str(path))
    model = onnx.load(path)
    assert tensor_bytes(model) < 0.65 * tensor_bytes(onnx.load(fp32_path))
    assert report["model"]["layers_rewritten"] == 36
    ops = {n.op_type for n in model.graph.node}
    assert ("MatMulNBits" in ops) if lowering == "ort" else ("DequantizeLinear" in ops)
    cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
    assert cos.mean() >= MIN_COSINE_MEAN and cos.min() >= MIN_COSINE_MIN, (cos.mean(), cos.min())


# Measured on these 100 verses: the defaults with --embeddings (word and position tables 4-bit block
# 32 too, read by GatherBlockQuantized) give cosine mean 0.9678 (0.9693 with the tables in float) in
# 14.2 MB of constants instead of 54.4 MB: the table costs little quality and most of the bytes.
MIN_TABLES_COSINE_MEAN = 0.965


def test_embedding_tables_quantized_data_free(fp32_path, sentences, reference, tmp_path):
    result = lrqgraph.run(fp32_path, OptimizeConfig(select=lrqgraph.SelectConfig(embeddings=True)))
    path = tmp_path / "tables.onnx"
    lrqgraph.save_model(result.model, path)
    model = onnx.load(path)
    assert result.report["model"]["layers_rewritten"] == 38  # 36 matrices, word and position tables
    assert sum(n.op_type == "GatherBlockQuantized" for n in model.graph.node) == 2
    assert tensor_bytes(model) < 0.17 * tensor_bytes(onnx.load(fp32_path))
    cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
    assert cos.mean() >= MIN_TABLES_COSINE_MEAN, cos.mean()


def test_defaults_match_onnxruntime_quantizer_at_no_more_bits(fp32_path, sentences, reference, tmp_path):
    from onnxruntime.quantization import matmul_nbits_quantizer as quant  # (part of onnxruntime: never skipped)
    baseline = quant.MatMulNBitsQuantizer(onnx.load(fp32_path), algo_config=quant.DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True))
    baseline.process()
    base_path = tmp_path / "ort4.onnx"
    baseline.model.save_model_to_file(str(base_path), use_external_data_format=False)
    ours = lrqgraph.run(fp32_path)
    ours_path = tmp_path / "ours.onnx"
    lrqgraph.save_model(ours.model, ours_path)
    assert tensor_bytes(onnx.load(ours_path)) <= tensor_bytes(onnx.load(base_path))
    base_cos = minilm.cosines(reference, minilm.embed(str(base_path), sentences)).mean()
    ours_cos = minilm.cosines(reference, minilm.embed(str(ours_path), sentences)).mean()
    assert ours_cos >= base_cos, (ours_cos, base_cos)


# Measured: GPTQ with H from 128 calibration verses, 4-bit block 32 (the defaults plus --calib),
# cosine mean 0.9925, min 0.9852 on the 200 evaluation verses (GPTQ + 2 coordinate-descent sweeps), 5.0 bits per weight.
MIN_CALIBRATED_COSINE_MEAN = 0.985


def test_calibrated_defaults_use_gptq_and_come_much_closer(fp32_path, sentences, reference, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))  # disjoint verses
    result = lrqgraph.run(fp32_path, OptimizeConfig(calib=str(calib)))
    assert {e["method"] for e in result.report["layers"] if e["action"] == "rewrite"} == {"gptq"}
    path = tmp_path / "gptq.onnx"
    lrqgraph.save_model(result.model, path)
    cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
    assert cos.mean() >= MIN_CALIBRATED_COSINE_MEAN, cos.mean()


# Measured (bench/allocate.py, 200 verses; this test's first 100 give the same to 0.001): --target-bpw 4
# with float16 scales reaches cosine mean 0.986-0.987 at 3.99 bits per weight; the issue asks >= 0.985.
# One-layer predictions vs measurements rank the 36 layers alike (Spearman 0.89 measured; asked >= 0.8).
MIN_ALLOCATED_COSINE_MEAN = 0.985
MIN_SPEARMAN = 0.8


def test_allocation_at_4_bits_per_weight_beats_the_issue_bar(fp32_path, sentences, reference, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))
    # the bar is the issue's for the 36 matrices (embedding tables in float, as when it was set)
    config = OptimizeConfig(calib=str(calib), allocate=lrqgraph.AllocateConfig(target_bpw=4.0),
                            factorize=lrqgraph.FactorizeConfig(scale_dtype="float16"),
                            select=lrqgraph.SelectConfig(embeddings=False))
    result = lrqgraph.run(fp32_path, config)
    alloc = result.report["allocation"]
    assert alloc["bpw"] <= 4.0 and result.report["model"]["rewritten_bpw"] <= 4.0
    assert alloc["spearman"] >= MIN_SPEARMAN, alloc["spearman"]
    path = tmp_path / "allocated.onnx"
    lrqgraph.save_model(result.model, path)
    cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
    assert cos.mean() >= MIN_ALLOCATED_COSINE_MEAN, cos.mean()


@pytest.fixture(scope="module")
def lrq_pairs(fp32_path, tmp_path_factory):
    """The same plans lowered to MatMulNBits (float activations) and to lrqgraph's ops (int8)."""
    from lrqgraph.runtime import available
    if not available():
        pytest.skip("native ops not built")
    import builders
    return {name: builders.lowered_both_ways(fp32_path, factorize, tmp_path_factory.mktemp(name))
            for name, factorize in LRQ_FORMS.items()}


LRQ_FORMS = {"dense": lrqgraph.FactorizeConfig(method="rtn", bits=4, block_size=32),
             "q+lr": lrqgraph.FactorizeConfig(method="qlr", bits=2, lr_bits=4, rank=64, block_size=32, iters=2)}
# Measured on these 100 verses: embeddings of the lrq model (int8 activations per block) against the
# ort model (float activations) of the same factors: cosine min 0.99965 (dense), 0.99975 (q+lr);
# against fp32 the two lowerings' means differ by 0.0002 (dense) and 0.0006 (q+lr). A wrong code,
# scale or wiring in the kernels drops far below these bars.
MIN_LRQ_VS_ORT_COSINE = 0.999
MAX_MEAN_COSINE_GAP = 0.002


@pytest.mark.parametrize("form", list(LRQ_FORMS))
def test_lrq_lowering_matches_ort(lrq_pairs, form, sentences, reference):
    paths = lrq_pairs[form]
    ops = {n.op_type for n in onnx.load(paths["lrq"], load_external_data=False).graph.node}
    assert ops >= ({"QMatMul"} if form == "dense" else {"QLowRankMatMul"})
    ort_emb, lrq_emb = (minilm.embed(str(paths[k]), sentences) for k in ("ort", "lrq"))
    cos = minilm.cosines(ort_emb, lrq_emb)
    assert cos.min() >= MIN_LRQ_VS_ORT_COSINE, cos.min()
    gap = minilm.cosines(reference, ort_emb).mean() - minilm.cosines(reference, lrq_emb).mean()
    assert abs(gap) <= MAX_MEAN_COSINE_GAP, gap
