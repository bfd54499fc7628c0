"""The ``osteofy`` command: parsing and wiring only; the work lives in importable functions.

Exit codes: 0 done; 2 usage or configuration error; 3 input rejected; 4 a needed service or
model is unavailable (DESIGN.md, "Command line").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from osteofy import __version__
from osteofy.errors import OsteofyError, Unavailable, UsageError

if TYPE_CHECKING:
    from cohort.check import Report

OWN_LOGGERS = ("osteofy", "cohort", "edge", "model", "quantize", "firmware_bridge", "dashboard")

# Subcommands of DESIGN.md that later versions provide; they answer with a clear message.
PLANNED: dict[str, str] = {}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix("osteofy").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.check is not None:
        from cohort.check import check_directory

        report = check_directory(Path(args.check))
        _print_report(report, args.json)
        return 0 if report.ok else 3
    if args.check_sampler:
        from cohort.check import check_plan

        report = check_plan(args.site, args.n or 20000, args.seed, args.preset)
        _print_report(report, args.json)
        return 0 if report.ok else 3
    if args.out is None or args.n is None:
        raise UsageError("simulate: --out and --n are required (or use --check DIR)")
    from cohort.generate import SimulateOptions, simulate

    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    manifest = simulate(
        Path(args.out),
        args.site,
        args.n,
        args.seed,
        preset=args.preset,
        options=SimulateOptions(
            max_side=args.max_side,
            compression=args.compress,
            counterfactual=not args.no_counterfactual,
            workers=workers,
            shift=args.shift,
        ),
        progress=not args.quiet,
    )
    print(f"wrote {args.n} synthetic {args.site} radiographs and {manifest}")
    return 0


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        print(report.text())


# The training side's commands that use Python 3.11+ (the device side runs on 3.10).
NEEDS_PYTHON_311 = ("dashboard serve", "bench", "demo")


def _need_python_311(what: str, version: Sequence[int] | None = None) -> None:
    have = tuple(sys.version_info[:2] if version is None else version[:2])
    if have < (3, 11):
        raise Unavailable(
            f"{what} needs Python 3.11 or newer; this is {'.'.join(map(str, have))}, which runs "
            "the device side only (screen, edge serve, bridge, doctor, build-engine)"
        )


def _need_torch(what: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise Unavailable(
            f"{what} needs PyTorch: pip install -e '.[train]' (the device runtime does not)"
        ) from None


def _cmd_train(args: argparse.Namespace) -> int:
    _need_torch("train")
    from model.train import TrainConfig, train

    cfg = TrainConfig(
        site=args.site,
        backbone=args.backbone,
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        image_only=args.image_only,
        threads=args.threads or 0,
        head=args.head,
        guidance=args.guidance,
        focus=args.focus,
        p_header_only=args.header_only_share,
        extra_data=[str(Path(d)) for d in args.data[1:]],
    )
    ckpt = train(Path(args.data[0]), Path(args.out), cfg, progress=not args.quiet)
    print(f"wrote {ckpt}; next: osteofy export {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _need_torch("export")
    from model.export import export_package

    card = export_package(Path(args.model_dir), name=args.name, version=args.version)
    print(f"wrote {Path(args.model_dir) / 'model.onnx'} and {card}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from model.evaluate import evaluate, write_report

    report = evaluate(
        Path(args.model_dir),
        Path(args.data),
        precision=args.precision,
        image_only=Path(args.image_only) if args.image_only else None,
        explain_n=args.explain,
        progress=not args.quiet,
        facts=args.facts,
    )
    paths = write_report(report, Path(args.out) if args.out else Path(args.model_dir) / "eval")
    if args.record:
        from model.evaluate import record_in_card

        record_in_card(Path(args.model_dir), report, args.record)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from quantize.run import QuantizeOptions, quantize_package

    report = quantize_package(
        Path(args.model_dir),
        Path(args.calib),
        Path(args.heldout) if args.heldout else None,
        QuantizeOptions(
            method=args.method, min_calibration=args.min_calibration, search=not args.no_search
        ),
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(report))
    else:
        f = report["fidelity"]
        lat = report["latency_onnxruntime_cpu"]
        print(
            f"wrote {Path(args.model_dir) / 'model.int8.onnx'}: gates hold on {f['n']} held-out "
            f"images (top-1 agreement {f['top1_agreement']:.4f}, |dAUROC| "
            f"{f['abs_delta_auroc']:.4f}, CAM Pearson median {f['cam_pearson_median']:.4f}); "
            f"kept FP32: {', '.join(report['kept_fp32']) or 'nothing'}; ONNX Runtime CPU p50 "
            f"FP32 {lat['fp32']['p50_ms']:.1f} ms vs INT8 {lat['int8']['p50_ms']:.1f} ms"
        )
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    from quantize.engine import build_engine

    cache = Path(args.cache) if args.cache else _config(args).data_dir / "engines"
    path = build_engine(Path(args.model_dir), cache, precision=args.precision, force=args.force)
    print(f"engine ready: {path}")
    return 0


def _config(args: argparse.Namespace):  # noqa: ANN202 - Config, imported lazily
    from osteofy.config import load_config

    return load_config(Path(args.config) if getattr(args, "config", None) else None)


def _cmd_screen(args: argparse.Namespace) -> int:
    from edge.screen_cli import screen_files

    return screen_files(
        _config(args),
        [Path(f) for f in args.files],
        as_json=args.json,
        overlay_dir=Path(args.overlay) if args.overlay else None,
        backend=args.backend,
        precision=args.precision,
        clinical=args.clinical,
    )


def _edge_usage(args: argparse.Namespace) -> int:
    raise UsageError("edge: give a command (serve)")


def _cmd_edge_serve(args: argparse.Namespace) -> int:
    from edge.audit import running
    from edge.serve import run_service

    cfg = _config(args)
    with running("edge", cfg.data_dir, cfg.model_dump(mode="json"), args.config):
        return run_service(cfg, once=args.once)


def _cmd_bench(args: argparse.Namespace) -> int:
    _need_python_311("bench")
    try:
        from bench.pipeline import run_bench
    except ImportError:
        raise Unavailable(
            "bench: the benchmarks live in the source tree (bench/); run from a checkout"
        ) from None
    res = run_bench(
        quick=args.quick,
        out_json=Path(args.out) if args.out else None,
        docs=None if args.no_docs else Path(args.docs),
    )
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"total p50 {res['total_ms_p50']:.1f} ms (uncompressed), "
            f"{res['speedup_vs_baseline']:.1f}x the research-style baseline"
            + ("" if args.no_docs else f"; wrote {args.docs}")
        )
    return 0


def _cmd_sbom(args: argparse.Namespace) -> int:
    from osteofy.sbom import write_sbom

    bom = write_sbom(Path(args.out), _config(args).models_dir)
    print(f"wrote {args.out}: CycloneDX, {len(bom['components'])} components")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from edge.doctor import run_doctor

    return run_doctor(_config(args), as_json=args.json)


def _bridge_usage(args: argparse.Namespace) -> int:
    raise UsageError("bridge: give a command (serve, simulate-digitizer)")


def _cmd_bridge_serve(args: argparse.Namespace) -> int:
    from edge.audit import running
    from firmware_bridge.service import quiet_libraries, serve

    quiet_libraries(args.verbose)
    cfg = _config(args)
    with running("bridge", cfg.data_dir, cfg.model_dump(mode="json"), args.config):
        return serve(cfg)


def _cmd_bridge_simulate(args: argparse.Namespace) -> int:
    from firmware_bridge.simulator import build_parser as sim_parser
    from firmware_bridge.simulator import run

    try:
        sim_args = sim_parser().parse_args(args.sim_args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run(sim_args)


def _dashboard_usage(args: argparse.Namespace) -> int:
    raise UsageError("dashboard: give a command (serve, dead-letters)")


def _cmd_dashboard_dead_letters(args: argparse.Namespace) -> int:
    from dashboard.ingest import print_dead_letters
    from dashboard.store import open_store

    store = open_store(_config(args).dashboard.db_url)
    try:
        return print_dead_letters(store, replay_them=args.replay, limit=args.limit)
    finally:
        store.close()


def _cmd_dashboard_serve(args: argparse.Namespace) -> int:
    _need_python_311("dashboard serve")
    from dashboard.service import serve
    from edge.audit import running

    cfg = _config(args)
    with running("dashboard", cfg.data_dir, cfg.model_dump(mode="json"), args.config):
        return serve(
            cfg,
            users_file=cfg.dashboard.users_file,
            client_id=cfg.dashboard.client_id,
            open_pages=cfg.dashboard.open_pages,
        )


def _cmd_demo(args: argparse.Namespace) -> int:
    _need_python_311("demo")
    from osteofy.demo import run_demo

    return run_demo(Path(args.out), scans=args.scans, quiet=args.quiet, headless=args.headless)


def _planned(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise Unavailable(f"{name}: {PLANNED[name]} is not part of version {__version__} yet")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="osteofy",
        description="Explainable osteoporosis screening on the X-ray device. "
        "A screening aid, not a diagnosis: confirm with DXA.",
    )
    parser.add_argument("--version", action="version", version=f"osteofy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sim = sub.add_parser("simulate", help="render a virtual cohort (synthetic DICOM + manifest)")
    sim.add_argument("--site", choices=("hand", "hip"), default="hand")
    sim.add_argument("--n", type=_positive_int, help="number of images")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", help="output folder")
    sim.add_argument("--preset", default="brief_cohort", help="brief_cohort | nhanes_2017")
    sim.add_argument("--workers", type=_positive_int, help="processes (default: all cores)")
    sim.add_argument(
        "--max-side",
        type=_positive_int,
        dest="max_side",
        help="coarsen the detector pitch so no side exceeds this many pixels",
    )
    sim.add_argument(
        "--compress",
        default="auto",
        choices=("auto", "none", "j2k"),
        help="auto: 20%% lossy JPEG 2000 as docs/cohort.md; j2k: all lossless",
    )
    sim.add_argument(
        "--no-counterfactual",
        action="store_true",
        help="skip the counterfactual attribution map (faster)",
    )
    sim.add_argument(
        "--shift",
        choices=("detector_dose_position",),
        help="draw acquisitions from a shifted distribution (robustness test sets)",
    )
    sim.add_argument("--check", metavar="DIR", help="run the acceptance checks on a cohort folder")
    sim.add_argument(
        "--check-sampler",
        action="store_true",
        help="run the acceptance checks on the sampler alone (no images)",
    )
    sim.add_argument("--json", action="store_true", help="checks as JSON")
    sim.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=_cmd_simulate)

    tr = sub.add_parser("train", help="train the fusion model on a folder (needs PyTorch)")
    tr.add_argument(
        "--data",
        required=True,
        action="append",
        help="folder with images and manifest/labels CSV (repeat to train on several folders, "
        "for example a mixed-domain split)",
    )
    tr.add_argument("--site", required=True, choices=("hand", "hip"))
    tr.add_argument("--out", required=True, help="model folder, e.g. models/hand-v1")
    tr.add_argument(
        "--backbone",
        default="mobilenet_v3_small_os16",
        choices=(
            "mobilenet_v3_small_os16",
            "mobilenet_v3_small",
            "mobilenet_v3_large",
            "mobilenet_v2",
        ),
    )
    tr.add_argument("--size", type=_positive_int, default=320, help="input size in pixels")
    tr.add_argument("--epochs", type=_positive_int, default=10)
    tr.add_argument("--batch-size", type=_positive_int, default=32, dest="batch_size")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=_positive_int, help="PyTorch threads")
    tr.add_argument(
        "--image-only",
        action="store_true",
        dest="image_only",
        help="train a baseline that never sees clinical facts",
    )
    tr.add_argument(
        "--head",
        default="ordinal",
        choices=("ordinal", "softmax"),
        help="ordinal: one T-score estimate that class, probabilities and referral follow from "
        "(default); softmax: three logits and a separate T-score (earlier packages)",
    )
    tr.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="weight of the mask-guidance loss that keeps the heat map on bone (needs the "
        "virtual cohort's masks; default %(default)s)",
    )
    tr.add_argument(
        "--focus",
        type=float,
        default=0.0,
        help="weight of the loss that pulls the heat map onto the region a radiologist reads "
        "(metacarpal shafts; femoral neck and trochanter); needs the virtual cohort's masks "
        "(default %(default)s)",
    )
    tr.add_argument(
        "--header-only-share",
        type=float,
        default=0.35,
        dest="header_only_share",
        help="share of training rows that keep only age, sex and weight (default %(default)s)",
    )
    tr.add_argument("-q", "--quiet", action="store_true")
    tr.set_defaults(func=_cmd_train)

    ex = sub.add_parser("export", help="write model.onnx and card.json from a checkpoint")
    ex.add_argument("model_dir")
    ex.add_argument("--name", help="model name (default: the folder name)")
    ex.add_argument("--version", default="1.0.0")
    ex.set_defaults(func=_cmd_export)

    ev = sub.add_parser("evaluate", help="evaluate a model package on a labelled folder")
    ev.add_argument("model_dir")
    ev.add_argument("--data", required=True)
    ev.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    ev.add_argument("--image-only", dest="image_only", help="image-only baseline package")
    ev.add_argument("--explain", type=int, default=200, help="images for explanation metrics")
    ev.add_argument(
        "--facts",
        default="all",
        choices=("all", "header", "none"),
        help="what the model is told: every fact of the manifest, only what a DICOM header "
        "carries (age, sex, weight), or nothing (default %(default)s)",
    )
    ev.add_argument("--out", help="report folder (default MODEL_DIR/eval)")
    ev.add_argument("--json", action="store_true", help="print the metrics JSON")
    ev.add_argument(
        "--record",
        metavar="NAME",
        help="also store the headline figures in the card as evaluation[NAME]",
    )
    ev.add_argument("-q", "--quiet", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    qz = sub.add_parser(
        "quantize",
        help="INT8 QDQ model with fidelity gates (exit 1 and nothing installed if they fail)",
    )
    qz.add_argument("model_dir")
    qz.add_argument("--calib", required=True, help="folder of calibration images (>= 500)")
    qz.add_argument("--heldout", help="folder for the fidelity gates (default: a third of --calib)")
    qz.add_argument("--method", default="percentile", choices=("minmax", "entropy", "percentile"))
    qz.add_argument("--min-calibration", type=_positive_int, default=500, dest="min_calibration")
    qz.add_argument(
        "--no-search",
        action="store_true",
        dest="no_search",
        help="do not keep sensitive layers in FP32 (fail instead)",
    )
    qz.add_argument("--json", action="store_true", help="print the report JSON")
    qz.add_argument("-q", "--quiet", action="store_true")
    qz.set_defaults(func=_cmd_quantize)

    be = sub.add_parser("build-engine", help="build and cache the TensorRT engine (Jetson)")
    be.add_argument("model_dir")
    be.add_argument(
        "--precision",
        default="int8",
        choices=("int8", "fp16"),
        help="int8 from model.int8.onnx; fp16 only when asked (never a silent downgrade)",
    )
    be.add_argument("--cache", help="engine cache folder (default DATA_DIR/engines)")
    be.add_argument("--config", help="configuration file")
    be.add_argument("--force", action="store_true", help="rebuild even when cached")
    be.set_defaults(func=_cmd_build_engine)

    sc = sub.add_parser("screen", help="screen radiograph files now (result, overlay, JSON)")
    sc.add_argument("files", nargs="+", metavar="FILE")
    sc.add_argument("--json", action="store_true", help="one JSON line per file, in order")
    sc.add_argument("--overlay", metavar="DIR", help="write each explanation image here")
    sc.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"))
    sc.add_argument("--precision", choices=("auto", "int8", "fp16", "fp32"))
    sc.add_argument(
        "--clinical",
        metavar="JSON",
        help="clinical facts as a JSON object (or @FILE), e.g. '{\"prior_fracture\": 1}'",
    )
    sc.add_argument("--config", help="configuration file")
    sc.set_defaults(func=_cmd_screen)

    edge = sub.add_parser("edge", help="the on-device runtime")
    edge_sub = edge.add_subparsers(dest="edge_command", metavar="COMMAND", parser_class=_Parser)
    es = edge_sub.add_parser("serve", help="watch the inbox and screen every study once")
    es.add_argument("--config", help="configuration file")
    es.add_argument("--once", action="store_true", help="process what is waiting, then exit")
    es.set_defaults(func=_cmd_edge_serve)
    edge.set_defaults(func=_edge_usage)

    br = sub.add_parser("bridge", help="receive images from the digitizer into the inbox")
    br_sub = br.add_subparsers(dest="bridge_command", metavar="COMMAND", parser_class=_Parser)
    bs = br_sub.add_parser("serve", help="DICOM C-STORE receiver, hot folder, serial link")
    bs.add_argument("--config", help="configuration file")
    bs.set_defaults(func=_cmd_bridge_serve)
    bsim = br_sub.add_parser(
        "simulate-digitizer",
        help="play a serial digitizer over a pseudo-terminal (see --help of the simulator)",
        add_help=False,
    )
    bsim.set_defaults(func=_cmd_bridge_simulate)
    br.set_defaults(func=_bridge_usage)

    dash = sub.add_parser("dashboard", help="the central dashboard (MQTT -> store -> web)")
    dash_sub = dash.add_subparsers(
        dest="dashboard_command", metavar="COMMAND", parser_class=_Parser
    )
    ds = dash_sub.add_parser("serve", help="subscribe, store and serve the web UI and API")
    ds.add_argument("--config", help="configuration file")
    ds.set_defaults(func=_cmd_dashboard_serve)
    dl = dash_sub.add_parser(
        "dead-letters", help="list the messages that could not be stored; --replay tries again"
    )
    dl.add_argument("--config", help="configuration file")
    dl.add_argument("--replay", action="store_true", help="run intake again on the kept bytes")
    dl.add_argument("--limit", type=int, default=100, help="how many to list (default 100)")
    dl.set_defaults(func=_cmd_dashboard_dead_letters)
    dash.set_defaults(func=_dashboard_usage)

    bn = sub.add_parser("bench", help="pipeline benchmark against a research-style baseline")
    bn.add_argument("--quick", action="store_true", help="4 scans, one pass (< 60 s)")
    bn.add_argument("--json", action="store_true", help="print the JSON result")
    bn.add_argument("--out", help="also write the JSON result to this file")
    bn.add_argument("--docs", default="docs/performance.md", help="markdown page to write")
    bn.add_argument("--no-docs", action="store_true", dest="no_docs")
    bn.set_defaults(func=_cmd_bench)

    sb = sub.add_parser("sbom", help="CycloneDX SBOM of the installed software and model packages")
    sb.add_argument("--out", required=True, help="file to write (JSON)")
    sb.add_argument("--config", help="configuration file (for models_dir)")
    sb.set_defaults(func=_cmd_sbom)

    doc = sub.add_parser("doctor", help="what this machine can screen with, and what is wrong")
    doc.add_argument("--config", help="configuration file")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=_cmd_doctor)

    demo = sub.add_parser("demo", help="the whole chain on this machine")
    demo.add_argument("--out", default="var/demo", help="working folder (default var/demo)")
    demo.add_argument("--scans", type=_positive_int, default=4, help="scans (hand and hip)")
    demo.add_argument(
        "--headless",
        action="store_true",
        help="run the scans, check each reached the dashboard, exit (0 only if all did)",
    )
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    for name, what in PLANNED.items():
        p = sub.add_parser(name, help=f"{what} (not yet available)", add_help=True)
        p.set_defaults(func=_planned(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sim: list[str] | None = None
    if argv[:2] == ["bridge", "simulate-digitizer"]:  # its own parser owns the rest
        argv, sim = argv[:2], argv[2:]
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if sim is not None:
            args.sim_args = sim
        if extra and args.command not in PLANNED:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        # Third-party libraries log at WARNING; our own parts at INFO (DEBUG with -v).
        logging.basicConfig(
            level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args))
    except OsteofyError as exc:
        print(f"osteofy: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("osteofy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
