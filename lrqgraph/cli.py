"""The ``lrqgraph`` command: optimize, inspect, lower, verify.

Exit codes: 0 done; 1 verification failed (--max-error); 2 bad input or options (one line naming
the file, node or option and what to do); 3 a bug in lrqgraph (one line naming the pass;
``--debug`` prints the traceback). Every output path is checked before any work, and nothing is
written unless the whole command succeeds.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .config import GOALS, AllocateConfig, OptimizeConfig, SelectConfig, VerifyConfig
from .errors import InternalError, LrqError
from .executor import KINDS, ExecutorConfig
from .methods import LOWERINGS, METHODS, GPTQConfig, QLRConfig, method_config
from .version import __version__

log = logging.getLogger("lrqgraph")

DEFAULTS = GPTQConfig()
# method options the CLI has flags for; only the ones given reach the method's config
METHOD_FLAGS = ("bits", "block_size", "symmetric", "clip_search", "rotate", "rank", "rank_ratio", "rank_bpw", "lr_bits",
                "seed", "scale_dtype")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("representation")
    g.add_argument("--method", choices=list(METHODS), default=DEFAULTS.method,
                   help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
                        + f" (default {DEFAULTS.method})")
    g.add_argument("--bits", type=int, help=f"code bits, 2..8 (default {DEFAULTS.bits})")
    g.add_argument("--block-size", type=int,
                   help=f"quantization block along K, 16..256, 0 = per channel (default {DEFAULTS.block_size})")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_const", const=True,
                     help="symmetric codes, no zero points (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False,
                     help="per-block zero points")
    g.add_argument("--scale-dtype", choices=("auto", "float16", "float32"),
                   help="scale type: auto = the weight's (the allocator's candidates: float16); float16 halves "
                        "the scale bytes of float32 models, cast once when onnxruntime loads them (default auto)")
    g.add_argument("--no-clip-search", dest="clip_search", action="store_const", const=False,
                   help="plain min/max scales instead of the per-block MSE-optimal clipping")
    g.add_argument("--clip-search", dest="clip_search", action="store_const", const=True,
                   help="per-block MSE-optimal clipping (the default, except on genai folders, where it costs decoders)")
    g.add_argument("--rotate", action="store_const", const=True,
                   help="randomized Hadamard rotation of each layer's input dimension before quantizing "
                        "(incoherence processing; a few small MatMuls per rotated input at run time)")
    rank = g.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="rank of low-rank factors")
    rank.add_argument("--rank-ratio", type=float, help="rank as a fraction of min(K, N)")
    rank.add_argument("--rank-bpw", type=float, help="per-layer rank from a bits-per-weight budget")
    g.add_argument("--lr-bits", type=int, help=f"qlr: bits of the low-rank factors (default {QLRConfig.lr_bits})")
    g.add_argument("--seed", type=int, help="seed of randomized methods (default 0)")
    s = p.add_argument_group("layer selection")
    s.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="only rewrite layers whose node or weight name matches (repeatable)")
    s.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="never rewrite layers whose node or weight name matches (repeatable)")
    s.add_argument("--op-types", default="MatMul,Gemm,Conv", help="op types to rewrite (default MatMul,Gemm,Conv)")
    s.add_argument("--min-params", type=int, default=SelectConfig.min_params,
                   help=f"skip weights with fewer parameters (default {SelectConfig.min_params})")
    s.add_argument("--output-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite layers that write a graph output (lm_head, classifier); default: only in an "
                        "allocation (--target-*, --min-cosine, --max-kl), where their measured tolerance decides, and on a "
                        "genai folder")
    s.add_argument("--include-output-layers", action="store_const", const=True, dest="output_layers",
                   help=argparse.SUPPRESS)  # the flag's earlier name
    s.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize embedding tables (Gather; a tied lm_head shares the table's codes); default: "
                        "only in an allocation and on a genai folder")


def _add_allocate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-layer allocation (one goal; candidates from the lowering's menu, "
                             "measured on the --calib inputs)")
    goal = g.add_mutually_exclusive_group()
    goal.add_argument("--target-bpw", type=float,
                      help="best measured quality within B bits per weight over the selected layers")
    goal.add_argument("--target-size", type=_size, metavar="SIZE",
                      help="best quality within a whole-model size: bytes, or with KB/MB/GB (10^3) or KiB/MiB/GiB")
    goal.add_argument("--min-cosine", type=float,
                      help="smallest model whose first output keeps this mean per-sample cosine")
    goal.add_argument("--max-kl", type=float,
                      help="smallest model whose first output (logits) keeps mean KL divergence below this")
    goal.add_argument("--labels", metavar="LABELS.npz",
                      help="lossless: the smallest model that loses neither top-1 accuracy nor log-loss on half of "
                           "these labelled samples (the model's inputs and 'labels'), checked on the other half")
    g.add_argument("--metric", choices=("cosine", "kl"), dest="measure",
                   help="what --target-bpw / --target-size minimise: cosine of the first output, or KL of its "
                        "softmax (default: kl when the first output is named like logits, else cosine)")
    g.add_argument("--families", type=lambda t: tuple(f.strip() for f in t.split(",") if f.strip()),
                   help="representation families the allocator may choose from, comma-separated "
                        "(dense, rotated, qlr, lowrank, kashin, kmeans; default: every family the lowering runs)")
    g.add_argument("--tables-in-budget", action=argparse.BooleanOptionalAction, default=None,
                   help="embedding tables (and a tied lm_head) compete for --target-bpw's bits like every other "
                        "layer (default: they take a fixed grid outside it, 8-bit from 4 bits per weight up, else 4-bit; "
                        "--target-size and the quality goals "
                        "always let them compete)")
    g.add_argument("--latency-budget", choices=("on", "off"), default="on",
                   help="on (default): drop candidates whose kernels run slower than the layer as onnxruntime's "
                        "4-bit RTN model runs it (timed on this machine, cached); off: choose on bytes and error alone")
    g.add_argument("--max-latency", type=float, metavar="RATIO",
                   help="also drop candidates slower than RATIO x the float layer (e.g. 0.8)")
    g.add_argument("--latency-rows", type=lambda t: tuple(int(r) for r in t.split(",") if r.strip()), metavar="M1,M2",
                   help="rows per call the latency budget holds at (default: one calibration sample's and eight "
                        "samples'; a decoder's 1 and 128)")
    g.add_argument("--report-html", help="write a self-contained HTML report with plots here")


def _size(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            lowered, scale = lowered[:-len(suffix)], factor
            break
    else:
        scale = 1
    try:
        return int(float(lowered) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 20MB, 1.5GiB, 1000000)") from None


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration and verification")
    g.add_argument("--calib", help="real model inputs: an .npz (keys = input names, samples on axis 0), a folder "
                   "of .npz files, or a text file with one sample per line (needs --tokenizer); used for "
                   "calibration statistics, allocation measurements and verification")
    g.add_argument("--tokenizer", help="tokenizer.json (or its folder) for text --calib data")
    g.add_argument("--calib-samples", type=int, default=OptimizeConfig.calib_samples,
                   help=f"use at most this many calibration samples (default {OptimizeConfig.calib_samples})")
    g.add_argument("--samples", type=int, default=VerifyConfig.samples,
                   help=f"synthetic samples when no --calib is given (default {VerifyConfig.samples})")
    g.add_argument("--verify-samples", type=int, default=VerifyConfig.calib_verify_samples,
                   help="verification compares outputs on at most this many --calib samples "
                   f"(default {VerifyConfig.calib_verify_samples})")
    g.add_argument("--max-error", type=float,
                   help="fail when max |Δ| / max |reference| of any output exceeds this")
    g.add_argument("--time-seconds", type=float, default=VerifyConfig.time_seconds,
                   help="seconds spent timing the original and the output in turns, per batch size "
                        f"(default {VerifyConfig.time_seconds:g}; 0: no timing)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser = argparse.ArgumentParser(prog="lrqgraph", parents=[common], description="Rewrite ONNX models "
                                     "into quantized low-rank subgraphs that onnxruntime runs.")
    parser.add_argument("--version", action="version", version=f"lrqgraph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", parents=[common], help="rewrite a model")
    opt.add_argument("model", help="input .onnx (external data beside it is read too), or an onnxruntime-genai "
                     "model folder (genai_config.json): the output is then a folder too")
    opt.add_argument("-o", "--output", required=True, help="output .onnx, or folder for a genai folder "
                     "(written atomically)")
    opt.add_argument("--lowering", choices=LOWERINGS, default="ort",
                     help="ort: com.microsoft MatMulNBits (default); std: DequantizeLinear + MatMul, opset 21; "
                          "lrq: lrqgraph's native custom ops (any bits 2..8)")
    opt.add_argument("--accuracy-level", type=int, choices=(0, 4),
                     help="activations the kernels may quantize: 0 float, 4 int8 per block (faster); "
                          "default: 4 for lrq, 0 for ort (4 for its 8-bit codes)")
    opt.add_argument("--passes", help="pipeline, e.g. 'discover,factorize(method=lplr,rank=64),lower(ort),cleanup,verify'")
    opt.add_argument("--report", help="write the JSON report here")
    opt.add_argument("--external-data", action="store_true", help="write weights to <output>.data")
    opt.add_argument("--check-each-pass", action="store_true", help="run onnx.checker and shape inference after every pass")
    opt.add_argument("--executor", choices=KINDS, default="auto",
                     help="where per-layer solves run: auto (worker processes on a multi-core machine when the "
                          "work is large enough; default), local (this process), process or ray (needs "
                          "lrqgraph[ray]); every one writes the same bytes")
    opt.add_argument("--workers", type=int, help="worker processes (default: the cores this process may use; "
                     "ray: the cluster's CPUs)")
    opt.add_argument("--resume", action="store_true",
                     help="reuse the per-layer results an interrupted run with the same model, data and options left")
    opt.add_argument("--ray-address", help="the Ray cluster of --executor ray (default: a new local one)")
    opt.add_argument("--stream-above", type=_size, metavar="SIZE", default=OptimizeConfig.stream_above,
                     help="stream a model with more weight bytes than this in external data: weights read one "
                          "tensor at a time and verification block by block, for models beyond memory "
                          "(default 2GiB; 0 streams every model with external data)")
    _add_method_options(opt)
    _add_allocate_options(opt)
    _add_verify_options(opt)

    ins = sub.add_parser("inspect", parents=[common], help="per-layer table: what optimize would do and why")
    ins.add_argument("model", help="an .onnx file or an onnxruntime-genai model folder")
    ins.add_argument("--lowering", choices=LOWERINGS, default="ort", help="the lowering optimize would use (default ort)")
    _add_method_options(ins)

    low = sub.add_parser("lower", parents=[common], help="convert a model's lrq custom ops (--lowering lrq) to ops "
                                                       "every onnxruntime has")
    low.add_argument("model", help="input .onnx written with --lowering lrq")
    low.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")
    low.add_argument("--to", choices=("ort", "std"), default="ort",
                     help="ort: com.microsoft MatMulNBits (default); std: DequantizeLinear + MatMul, opset 21")
    low.add_argument("--accuracy-level", type=int, choices=(0, 4),
                     help="MatMulNBits' activation precision (ort): 0 float, 4 int8; default 0 (4 for 8-bit codes)")
    low.add_argument("--external-data", action="store_true", help="write weights to <output>.data")

    ver = sub.add_parser("verify", parents=[common], help="compare two models' outputs in onnxruntime")
    ver.add_argument("reference")
    ver.add_argument("candidate")
    _add_verify_options(ver)
    return parser


def verify_config(args: argparse.Namespace) -> VerifyConfig:
    return VerifyConfig(samples=args.samples, calib=args.calib, tokenizer=args.tokenizer,
                        calib_samples=args.calib_samples, calib_verify_samples=args.verify_samples,
                        max_error=args.max_error, time_seconds=getattr(args, "time_seconds", VerifyConfig.time_seconds))


def config_from_args(args: argparse.Namespace) -> OptimizeConfig:
    select = SelectConfig(op_types=tuple(t.strip() for t in args.op_types.split(",") if t.strip()),
                          include=tuple(args.include), exclude=tuple(args.exclude),
                          min_params=args.min_params,
                          keep_output_layers=None if args.output_layers is None else not args.output_layers,
                          embeddings=args.embeddings)
    given = {("target_bpw" if k == "rank_bpw" else k): getattr(args, k) for k in METHOD_FLAGS
             if getattr(args, k, None) is not None}
    factorize = method_config(args.method, **given)
    verify = verify_config(args) if hasattr(args, "samples") else VerifyConfig()
    allocate = AllocateConfig(**{k: getattr(args, k, None) for k in GOALS if k != "max_metric"},
                              families=getattr(args, "families", None) or (), measure=getattr(args, "measure", None),
                              tables_in_budget=getattr(args, "tables_in_budget", None),
                              latency_budget=getattr(args, "latency_budget", "on") == "on",
                              max_latency=getattr(args, "max_latency", None),
                              latency_rows=getattr(args, "latency_rows", None) or ())
    return OptimizeConfig(select=select, factorize=factorize, verify=verify, allocate=allocate,
                          lowering=getattr(args, "lowering", "ort"),
                          accuracy_level=getattr(args, "accuracy_level", None), calib=getattr(args, "calib", None),
                          tokenizer=getattr(args, "tokenizer", None),
                          calib_samples=getattr(args, "calib_samples", OptimizeConfig.calib_samples),
                          check_each_pass=getattr(args, "check_each_pass", False),
                          executor=ExecutorConfig(getattr(args, "executor", "auto"), getattr(args, "workers", None),
                                                   getattr(args, "ray_address", None)),
                          resume=getattr(args, "resume", False),
                          stream_above=getattr(args, "stream_above", OptimizeConfig.stream_above))


def cmd_optimize(args: argparse.Namespace) -> int:
    from . import genai
    from .api import run
    from .io import Outputs, save_model
    from .report import layer_table, summary

    src, dst = Path(args.model), Path(args.output)
    folder = genai.open_folder(src) if genai.is_folder(src) else None
    if folder is not None:
        genai.check_output_folder(dst, folder)
        _check_outputs(folder.model_file, None, args.external_data, args.report, args.report_html)
    else:
        _check_outputs(src, dst, args.external_data, args.report, args.report_html)
    _check_inputs(args)
    if folder is not None and args.clip_search is None and hasattr(METHODS[args.method].config, "clip_search"):
        args.clip_search = False  # decoders' default (genai.deploy_config)
    config = config_from_args(args)
    if folder is not None:
        config = genai.deploy_config(config, folder)
    if args.report_html:
        from .html_report import render as render_html, require_matplotlib
        require_matplotlib()  # before the work, not after
    result = run(folder.model_file if folder else src, config, passes=args.passes)
    with Outputs() as outputs:
        if folder is not None:
            staged = genai.write_folder(folder, result.model, dst, outputs,
                                        library=genai.custom_ops_library(result.model))
            written = [p for p in staged.rglob("*") if p.is_file()]
            before = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        else:
            save_model(result.model, dst, external_data=True if args.external_data else None, source=src,
                       outputs=outputs)
            written, before = outputs.staged_files(), _file_bytes(src)
        result.report["model"]["file_bytes_before"] = before
        result.report["model"]["file_bytes_after"] = sum(p.stat().st_size for p in written)
        text = layer_table(result.report["layers"]) + "\n" + summary(result.report)
        if args.report:
            outputs.stage(args.report).write_text(json.dumps(result.report, indent=2, default=str) + "\n",
                                                  encoding="utf-8")
        if args.report_html:
            outputs.stage(args.report_html).write_text(render_html(result.report), encoding="utf-8")
        outputs.commit()
    if not args.quiet:
        print(text)
        print(f"wrote {dst}")
    return 0


def _check_inputs(args: argparse.Namespace) -> None:
    """Files the command will read besides the model, checked before any work."""
    for flag, value in (("--calib", getattr(args, "calib", None)), ("--tokenizer", getattr(args, "tokenizer", None))):
        if value and not Path(value).exists():
            raise LrqError(f"{value}: no such file or folder (given as {flag})")


def _check_outputs(src: Path, dst: Path | None, external_data: bool, *reports: str | None) -> None:
    """Every path the command will write, checked before any work (rule: nothing partial);
    ``dst`` None: the model goes to a folder, checked apart."""
    from .io import check_output_path

    named = []
    if dst is not None:
        check_output_path(dst, "output", src)
        check_output_path(dst.with_name(dst.name + ".data"), "external data", src)
        named.append(Path(dst))
    for path in filter(None, reports):
        check_output_path(path, "report", src)
        if any(Path(path).resolve() == p.resolve() for p in named):
            raise LrqError(f"{path}: written twice (model, report and HTML report need distinct paths)")
        named.append(Path(path))


def cmd_lower(args: argparse.Namespace) -> int:
    import onnx

    from .api import run
    from .io import save_model

    src, dst = Path(args.model), Path(args.output)
    _check_outputs(src, dst, args.external_data)
    level = "" if args.accuracy_level is None else f",accuracy_level={args.accuracy_level}"
    result = run(src, OptimizeConfig(), passes=f"relower({args.to}{level}),cleanup")
    converted = sum(n.domain == "lrq" for n in onnx.load(str(src), load_external_data=False).graph.node)
    if not converted:
        log.warning("%s has no lrq custom ops; written unchanged", src)
    save_model(result.model, dst, external_data=True if args.external_data else None, source=src)
    if not args.quiet:
        ops = "MatMulNBits" if args.to == "ort" else "DequantizeLinear + MatMul"
        print(f"wrote {dst}: {converted} lrq nodes as {ops}")
    return 0


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect_layers
    from .report import table

    from . import genai

    model, config = args.model, config_from_args(args)
    if genai.is_folder(model):
        folder = genai.open_folder(model)
        model, config = folder.model_file, genai.deploy_config(config, folder)
    rows = inspect_layers(model, config)
    print(table(["layer", "op", "shape", "params", "action", "why"],
                [[r["name"], r["op"], "x".join(map(str, r["shape"])) or "-", r["params"] or "",
                  r["action"], r["why"]] for r in rows]))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import compare_models
    from .report import summary

    _check_inputs(args)
    report = compare_models(args.reference, args.candidate, verify_config(args))
    print(summary({"verify": report}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    handler = {"optimize": cmd_optimize, "inspect": cmd_inspect, "lower": cmd_lower, "verify": cmd_verify}[args.command]
    try:
        return handler(args)
    except LrqError as exc:
        print(f"lrqgraph: {'' if exc.exit_code == 1 else 'error: '}{_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lrqgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for users, the traceback with --debug
        if args.debug:
            traceback.print_exception(exc)
        where = "" if isinstance(exc, InternalError) else f"{type(exc).__name__}: "
        print(f"lrqgraph: internal error: {where}{_one_line(exc)}"
              f"{'' if args.debug else ' (a bug in lrqgraph; rerun with --debug for the traceback)'}",
              file=sys.stderr)
        return InternalError.exit_code


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
