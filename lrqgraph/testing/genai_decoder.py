"""A tiny decoder as LLM users deploy it: a random Llama (transformers, seeded, tied embeddings)
with a byte-level BPE tokenizer trained on a few KJV-style lines, built into an
onnxruntime-genai folder by onnxruntime-genai's own model builder (``-p fp32 -e cpu``):
GroupQueryAttention with a KV cache, SimplifiedLayerNormalization in the default domain,
``genai_config.json`` and the tokenizer. Random weights: structure, never quality.

Cached as ``<cache>/genai-llama-<key>/`` keyed by the versions of the packages that build it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from lrqgraph.atomic import atomic_folder
from lrqgraph.cache import fixture_dir

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0,
              eos_token_id=1)
PACKAGES = ("onnxruntime-genai", "onnxruntime", "torch", "transformers", "tokenizers", "onnx", "onnx-ir")
TEXT = ["In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And God said, Let there be light: and there was light.",
        "And God saw the light, that it was good: and God divided the light from the darkness."]


def folder(precision: str = "fp32") -> Path:
    """The builder's folder (``-p fp32`` or ``-p int4``, its defaults), built on first use."""
    versions = [metadata.version(p) for p in PACKAGES]
    key = hashlib.sha256(f"{versions}|{sorted(CONFIG.items())}|{TEXT}|{precision}".encode()).hexdigest()[:12]
    target = fixture_dir() / f"genai-llama-{precision}-{key}"
    if (target / "genai_config.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix=".genai-", dir=fixture_dir()) as work, atomic_folder(target) as out:
        work = Path(work)
        _hf_folder(work / "hf")
        build = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"),
                                "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "cache")],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if build.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai's builder failed: {build.stderr[-2000:]}")
    return target


def _hf_folder(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"],
                                                      special_tokens=["<s>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))


def teacher_forced_logits(model_folder: str | os.PathLike, ids: list[int]):
    """The logits onnxruntime-genai computes for ``ids`` appended as one prompt: [len(ids), vocab]."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(ids) + 1, cache_floor(model_folder)), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, np.int32))
    return np.asarray(generator.get_output("logits"), np.float32).reshape(len(ids), -1)


def generate(model_folder: str | os.PathLike, prompt: str, new_tokens: int = 8) -> list[int]:
    """Greedy continuation of ``prompt`` through onnxruntime-genai (token ids, prompt included)."""
    import onnxruntime_genai as og

    model = og.Model(str(model_folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(ids) + new_tokens, cache_floor(model_folder)), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    for _ in range(new_tokens):
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def cache_floor(model_folder: str | os.PathLike) -> int:
    """The smallest ``max_length`` onnxruntime-genai accepts for the folder: sliding-window layers
    need a KV cache of at least the window."""
    import json
    config = json.loads((Path(model_folder) / "genai_config.json").read_text())
    window = config["model"]["decoder"].get("sliding_window") or {}
    return int(window.get("window_size", 0))
