"""onnxruntime-genai model folders: a folder in, a folder out.

The builder (``python -m onnxruntime_genai.models.builder``) writes ``genai_config.json`` (which
names the model file, the context length and the session options), the model with its external
data, and the tokenizer files. lrqgraph reads the model the config names and writes a folder that
``onnxruntime_genai.Model`` loads: every file of the input folder copied, the model replaced by the
rewritten one, and, for a model lowered to lrqgraph's custom ops, the op library copied in and
named in the config (onnxruntime-genai loads a library only from inside the model folder).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .config import OptimizeConfig
from .errors import LrqError
from .methods import GPTQConfig
from .io import Outputs, data_files, save_model, uses_external_data

CONFIG_NAME = "genai_config.json"


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is an onnxruntime-genai model folder."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


@dataclass(frozen=True)
class GenaiFolder:
    path: Path
    config: dict[str, Any]

    @property
    def decoder(self) -> dict[str, Any]:
        return self.config["model"]["decoder"]

    @property
    def model_file(self) -> Path:
        return self.path / self.decoder["filename"]

    @property
    def tokenizer(self) -> Path | None:
        """The folder itself when it holds the tokenizer (``tokenizer.json``)."""
        return self.path if (self.path / "tokenizer.json").is_file() else None

    @property
    def context_length(self) -> int | None:
        length = self.config["model"].get("context_length")
        return int(length) if length else None


def open_folder(path: str | Path) -> GenaiFolder:
    """Read a genai folder's config, or raise LrqError saying what is wrong with it."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LrqError(f"{config_path}: not a readable genai_config.json ({type(exc).__name__}: {exc})") from None
    decoder = (config.get("model") or {}).get("decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict) or not isinstance(decoder.get("filename"), str):
        raise LrqError(f"{config_path}: has no model.decoder.filename; is this an onnxruntime-genai folder?")
    folder = GenaiFolder(path, config)
    if not folder.model_file.is_file():
        raise LrqError(f"{config_path}: names the model {decoder['filename']}, which is not in {path}")
    return folder


def check_output_folder(path: str | Path, source: GenaiFolder) -> Path:
    """Refuse, before any work, an output folder that would overwrite the input or a foreign folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LrqError(f"{path}: is a file; the output of a genai folder is a folder")
    if not path.parent.exists():
        raise LrqError(f"{path.parent}: output's parent folder does not exist; create it first")
    if path.exists() and path.resolve() == source.path.resolve():
        raise LrqError(f"{path}: output folder is the input folder; choose another folder")
    if path.exists() and any(path.iterdir()) and not is_folder(path):
        raise LrqError(f"{path}: exists and is not a genai model folder; choose a new or empty folder")
    return path


def write_folder(source: GenaiFolder, model: onnx.ModelProto, target: str | Path, outputs: Outputs,
                 library: Path | None = None) -> Path:
    """Stage the output folder (committed by ``outputs``): the input folder's files, ``model`` in
    place of its model, and ``library`` copied in and named as the decoder's custom-op library.
    Returns the staged folder's path."""
    staged = outputs.stage(target)
    staged.mkdir()
    model_file = source.model_file
    replaced = {model_file.resolve(), *(f.resolve() for f in data_files(model_file))}
    for item in sorted(source.path.iterdir()):
        if item.resolve() in replaced or item.name == CONFIG_NAME:
            continue
        if item.is_dir():
            shutil.copytree(item, staged / item.name)
        else:
            shutil.copy2(item, staged / item.name)
    external = uses_external_data(onnx.load(str(model_file), load_external_data=False))
    save_model(model, staged / model_file.name, external_data=True if external else None)
    config = json.loads(json.dumps(source.config))
    options = config["model"]["decoder"].setdefault("session_options", {})
    if library is not None:
        shutil.copy2(library, staged / library.name)
        options["custom_ops_library"] = library.name
    else:
        options.pop("custom_ops_library", None)
    (staged / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return staged


def deploy_config(config: OptimizeConfig | None, folder: GenaiFolder) -> OptimizeConfig:
    """The options a genai folder runs with, where the caller left them open (None): the
    embedding table and the lm_head (tied in most small decoders, where the table is a large share
    of the bytes) are rewritten like every other layer, and MatMulNBits quantizes activations to
    int8 (accuracy level 4), as the builder's int4 does; text calibration data reads the folder's
    tokenizer. Without a config at all, scales are plain min/max (``clip_search=False``).

    Measured on Gemma 3 270M (bench/genai.py): the per-block MSE clipping that serves encoders
    costs decoders (KJV perplexity 2.43x fp32 against 1.62x without it, movie reviews equal), and
    int8 activations decode 3.7x faster than float ones (55.9 against 15.2 tokens/s) for 0.004x of
    perplexity."""
    if config is None:
        config = OptimizeConfig(factorize=GPTQConfig(clip_search=False))
    select = dataclasses.replace(
        config.select, embeddings=True if config.select.embeddings is None else config.select.embeddings,
        keep_output_layers=False if config.select.keep_output_layers is None else config.select.keep_output_layers)
    tokenizer = config.tokenizer
    if tokenizer is None and config.calib and Path(config.calib).is_file() and Path(config.calib).suffix != ".npz":
        tokenizer = str(folder.tokenizer) if folder.tokenizer else None
    level = 4 if config.accuracy_level is None and config.lowering == "ort" else config.accuracy_level
    return dataclasses.replace(config, select=select, tokenizer=tokenizer, accuracy_level=level)


def custom_ops_library(model: onnx.ModelProto) -> Path | None:
    """lrqgraph's custom-op library when ``model`` uses its ops (the folder must then carry it)."""
    from .runtime.native_ops import DOMAIN, library_path

    return library_path() if any(o.domain == DOMAIN for o in model.opset_import) else None
