"""kmeans: a per-tensor 1-D k-means codebook of 2^bits float16 levels (no scales)."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.numerics import Representation, codebook_quantize
from lrqgraph.numerics.pack import packed_nbytes
from lrqgraph.numerics.quant import CODEBOOK_BITS

from .base import Method, MethodConfig, register_method


@dataclass(frozen=True)
class KMeansConfig(MethodConfig):
    method = "kmeans"


def storage(cfg: KMeansConfig, k: int, n: int, scale_dtype: str) -> tuple[int, str]:
    return packed_nbytes(k * n, cfg.bits) * 8 + (1 << cfg.bits) * CODEBOOK_BITS, f"kmeans, {cfg.bits}-bit codebook"


def factorize(w, cfg: KMeansConfig, scale_dtype: str, h=None):
    return Representation(((codebook_quantize(w, cfg.bits),),), "kmeans"), ""


METHOD = register_method(Method(
    "kmeans", KMeansConfig, factorize, storage, forms=("codebook",), lowerings=("lrq",),
    menu=lambda lowering: ({"bits": 3}, {"bits": 4}) if lowering == "lrq" else (),
    summary="per-tensor k-means codebook (lrq::KashinMatMul)"))
