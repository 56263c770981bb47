"""Builds lrqgraph's native onnxruntime custom-op library during ``pip install`` (also ``-e``).

onnxruntime's C/C++ API headers come from ``$LRQGRAPH_ORT_INCLUDE_DIR`` (any folder holding
``onnxruntime_cxx_api.h``, e.g. the ``include/`` of an official release), else from a cache
(``$LRQGRAPH_CACHE`` or ``~/.cache/lrqgraph``), else from the npm package
com.github.asus4.onnxruntime@0.4.9 (onnxruntime's official headers, API version 29), downloaded
once and checked against its published SHA-512. Headers are never committed and the library does
not link onnxruntime. Without a C++ compiler or headers the package installs without the
library (pure Python lowerings still work) and says why; ``LRQGRAPH_REQUIRE_NATIVE=1`` makes
that an error instead.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NPM_TARBALL = "https://registry.npmjs.org/com.github.asus4.onnxruntime/-/com.github.asus4.onnxruntime-0.4.9.tgz"
NPM_SHA512 = "BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
HEADERS_IN_TARBALL = ("package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/"
                      "onnxruntime.framework/Headers/")
REQUIRED = os.environ.get("LRQGRAPH_REQUIRE_NATIVE") == "1"  # a failed build fails the install


def _cache() -> Path:
    return Path(os.environ.get("LRQGRAPH_CACHE") or Path.home() / ".cache" / "lrqgraph")


def ort_headers() -> Path:
    given = os.environ.get("LRQGRAPH_ORT_INCLUDE_DIR")
    if given:
        if not (Path(given) / "onnxruntime_cxx_api.h").exists():
            raise RuntimeError(f"LRQGRAPH_ORT_INCLUDE_DIR={given} holds no onnxruntime_cxx_api.h")
        return Path(given)
    target = _cache() / "onnxruntime-headers-npm-0.4.9"
    if (target / "onnxruntime_cxx_api.h").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tarball = Path(tmp) / "ort.tgz"
        digest = hashlib.sha512()
        with urllib.request.urlopen(NPM_TARBALL, timeout=120) as response, open(tarball, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if base64.b64encode(digest.digest()).decode() != NPM_SHA512:
            raise RuntimeError(f"{NPM_TARBALL}: SHA-512 mismatch; refusing its headers")
        staging = Path(tmp) / "headers"
        staging.mkdir()
        with tarfile.open(tarball) as tar:
            for member in tar:
                if member.isfile() and member.name.startswith(HEADERS_IN_TARBALL) and member.name.endswith(".h"):
                    (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        if not (staging / "onnxruntime_cxx_api.h").exists():
            raise RuntimeError(f"{NPM_TARBALL}: no onnxruntime headers where expected")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


class BuildNative(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            ext.include_dirs.append(str(ort_headers()))
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any failure leaves a working pure-Python install
            if REQUIRED:
                raise
            print(f"lrqgraph: native custom ops not built ({type(exc).__name__}: {exc}); "
                  f"the lrq lowering will be unavailable")

    def get_ext_filename(self, ext_name: str) -> str:
        # a plain shared library for onnxruntime, not a Python extension module
        return os.path.join(*ext_name.split(".")[:-1], f"lib{ext_name.split('.')[-1]}.so")

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return ["RegisterCustomOps", "LrqOpSchema"]


setup(
    ext_modules=[Extension(
        "lrqgraph.runtime.lrq_ops",
        sources=["runtime/native/lrq_ops.cc", "runtime/native/float_kernel.cc", "runtime/native/int8_kernel.cc",
                 "runtime/native/int8_avx512.cc", "runtime/native/int8_avx2.cc", "runtime/native/codebook_kernel.cc"],
        depends=["runtime/native/kernels.h", "runtime/native/int8_layout.h", "runtime/native/int8_simd.h"],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wno-psabi"],
        # stripped: a genai folder carries the library, and its debug information is 14x the code
        extra_link_args=["-s"],
        # optional: setuptools then copies the library into the source tree (editable installs,
        # --inplace) only when it was built. Not when it is required: setuptools would turn the
        # build error into a warning.
        optional=not REQUIRED,
    )],
    cmdclass={"build_ext": BuildNative},
)
