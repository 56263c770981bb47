"""A small Llama-style decoder (transformers' LlamaForCausalLM, seeded random weights) exported
with ``torch.onnx.export(dynamo=True)`` at opset 18 with its weights in external data: the
structure of real decoders (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP,
logits over a vocabulary) for structure tests, never for judging quality.

Input ``input_ids`` [batch, sequence] (int64); output ``logits`` [batch, sequence, vocab]. Cached
as a folder ``<cache>/llama-tiny-<key>/model.onnx`` (+ ``model.onnx.data``).
"""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from lrqgraph.atomic import atomic_folder
from lrqgraph.cache import fixture_dir

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False)
OPSET = 18


def onnx_path() -> Path:
    versions = [metadata.version(p) for p in ("torch", "transformers", "onnxscript")]
    key = hashlib.sha256(f"{versions}|{sorted(CONFIG.items())}|opset{OPSET}".encode()).hexdigest()[:12]
    folder = fixture_dir() / f"llama-tiny-{key}"
    if not (folder / "model.onnx").exists():
        with atomic_folder(folder) as tmp:
            _export(tmp / "model.onnx")
    return folder / "model.onnx"


def _export(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, use_cache=False)).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=CONFIG["max_position_embeddings"])
    with torch.no_grad():
        program = torch.onnx.export(Logits(model), (ids,), input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes=({0: batch, 1: seq},), opset_version=OPSET, dynamo=True,
                                    external_data=True)
        program.save(str(path), external_data=True)


def token_batches(count: int = 16, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Token-id calibration inputs (uniform ids: the weights are random, so is the text)."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, CONFIG["vocab_size"], (count, length)).astype(np.int64)}
