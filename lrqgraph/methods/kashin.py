"""kashin: Kashin decomposition W = norm·(U + F1·V·F2ᵀ) with the (u, v) pairs coded into a 2-D
codebook (falls back to 1-D k-means, reported, when the split does not converge)."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.errors import LrqError
from lrqgraph.numerics.kashin import kashin_quantize
from lrqgraph.numerics.pack import packed_nbytes
from lrqgraph.numerics.quant import CODEBOOK_BITS
from lrqgraph.numerics.transforms import KINDS, MatrixTransform

from .base import Method, MethodConfig, register_method


@dataclass(frozen=True)
class KashinConfig(MethodConfig):
    method = "kashin"
    transform: str = "hadamard"    # dct, hadamard or qr (the native kernel runs hadamard)
    tol: float = 1e-3              # relative residual that ends the decomposition
    max_iter: int = 200            # decomposition steps before falling back to kmeans

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transform not in KINDS:
            raise LrqError(f"transform must be one of {', '.join(KINDS)}, got '{self.transform}'")


def storage(cfg: KashinConfig, k: int, n: int, scale_dtype: str) -> tuple[int, str]:
    # codes, the [2^b, 2] float16 codebook, the float32 norm and what rebuilds the transform
    bits = (packed_nbytes(k * n, cfg.bits) * 8 + (2 << cfg.bits) * CODEBOOK_BITS + 32
            + MatrixTransform(cfg.transform, (k, n), cfg.seed).stored_bits())
    return bits, f"kashin ({cfg.transform}), {cfg.bits}-bit codebook"


def factorize(w, cfg: KashinConfig, scale_dtype: str, h=None):
    return kashin_quantize(w, cfg.bits, cfg.transform, cfg.seed, cfg.tol, cfg.max_iter), ""


def transform_refusal(transform: str) -> str:
    """'' when the native kernel runs ``transform``, else why not and what to pass instead."""
    if transform == "hadamard":
        return ""
    return (f"lrq::KashinMatMul runs Hadamard transforms, not '{transform}'; set transform=hadamard (the "
            f"default), e.g. --passes 'discover,factorize(method=kashin,transform=hadamard),lower(lrq),cleanup,verify'")


def lowering_check(cfg: KashinConfig, lowering: str) -> str:
    return transform_refusal(cfg.transform)


METHOD = register_method(Method(
    "kashin", KashinConfig, factorize, storage, forms=("codebook",), lowerings=("lrq",),
    lowering_check=lowering_check,
    menu=lambda lowering: ({"bits": 3},) if lowering == "lrq" else (),
    summary="Kashin decomposition with a 2-D codebook (lrq::KashinMatMul)"))
