"""The ``amodal`` command.

Every mistake ends in one line on stderr, ``amodal: what is wrong (what to do)``, and an exit code:
2 for bad usage or input, 1 for a service that cannot be reached or fails. ``AMODAL_DEBUG=1`` shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from amodal.cli import common
from amodal.errors import ServiceError, UsageError
from amodal.stages import NAMES
from amodal.settings import PRESETS
from amodal.state import OUTCOMES

SET_HELP = "override a setting (repeatable; after AMODAL_SETTINGS; `amodal settings` lists them)"


def cmd_run(args: argparse.Namespace) -> int:
    from amodal.models.registry import ModelSet, check_model_dir
    from amodal.report import write_local_report
    from amodal.runner import run_local

    settings = common.settings(args)
    options, fmt = _shard_options(args)
    check_model_dir(common.model_dir(args), settings)
    out = Path(args.out)
    rows = None
    if fmt is None:
        images, annotations = Path(args.images), Path(args.annotations)
    else:  # shards: each sample's image written into OUT/inputs
        from producer.shards import local_rows, samples, shard_rows

        images, annotations = out / "inputs", Path(args.annotations) if args.annotations else None
        rows = list(local_rows(shard_rows(samples(args.images, options, fmt), options, annotations), images))
    outcomes = run_local(images, annotations, out, ModelSet(common.model_dir(args), settings), settings,
                         progress=not args.quiet, rows=rows)
    page = write_local_report(out, images, outcomes)
    counts = collections.Counter(o.status for o in outcomes)
    print(json.dumps({"rows": len(outcomes), **counts, "manifest": str(out / "manifest.jsonl"), "report": str(page)}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    if args.action == "tiny":
        from amodal.models.tiny import write_tiny_models

        written = write_tiny_models(target)
        print(f"wrote {len(written)} tiny random-weight models into {target} (their results are noise)")
    else:
        from amodal.models.download import download_models

        download_models(target, which=args.only, sam_variant=args.sam_variant)
    return 0


def _shard_options(args: argparse.Namespace):
    """The shard reading options of ``submit``/``run`` and the input's format (None: a folder of images)."""
    from producer.shards import ShardOptions, detect_format

    if not (args.images.startswith("s3://") or "{" in args.images or Path(args.images).exists()):
        raise UsageError(f"--images: no such file or folder: {args.images}")
    options = ShardOptions(format=args.input_format, query=args.query, query_field=args.query_field,
                           image_field=args.image_field, mask_field=args.mask_field, key_field=args.key_field)
    fmt = args.input_format or detect_format(args.images)
    if not (args.images.startswith("s3://") or "{" in args.images):
        common.existing(args.images, "--images", folder=fmt is None or Path(args.images).is_dir())
    if fmt is None and (not args.annotations or args.query):
        raise UsageError("--images is a folder of images: give --annotations FILE (--query goes with shards: "
                         "WebDataset .tar, Parquet, a saved Hugging Face dataset)")
    if args.annotations:
        common.existing(args.annotations, "--annotations", folder=False)
    return options, fmt


def cmd_submit(args: argparse.Namespace) -> int:
    settings = common.settings(args)
    options, _ = _shard_options(args)
    report = common.client(settings, writes=True).submit_dataset(args.images, args.annotations, args.dataset,
                                                           progress=not args.quiet, shards=options)
    print(f"recorded {report.enqueued} rows of dataset {args.dataset} for the dispatcher to start"
          f" ({report.finished} already have an outcome, {len(report.invalid)} refused)", file=sys.stderr)
    print(json.dumps({"rows": report.rows, "recorded": report.enqueued, "finished": report.finished,
                      "invalid": len(report.invalid)}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from producer.status import print_workers, show_status, write_dataset_report

    if args.workers:
        from producer.checks import check_broker

        check_broker()
        print_workers()
        if not args.dataset:
            return 0
    if not args.dataset:
        raise UsageError("status needs --dataset NAME (or --workers alone)")
    if args.timeout is not None and not args.wait:
        raise UsageError("--timeout applies to --wait: add --wait")
    client = common.client()
    if args.manifest:
        for line in client.manifest(args.dataset):
            if (not args.flagged or line.get("flags")) and (not args.status or line["status"] in args.status):
                print(json.dumps(line))
        return 0
    if args.report:
        pages = write_dataset_report(client, args.dataset, Path(args.report), limit=args.limit,
                                     flagged=args.flagged, statuses=args.status)
        print(json.dumps({"report": str(pages[0]), "pages": len(pages)}))
        return 0
    print(json.dumps(show_status(client, args.dataset, wait=args.wait, interval=args.interval, stall=args.stall,
                                 timeout=args.timeout)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from producer.export import ExportFilter, export_dataset

    keep = ExportFilter(statuses=tuple(args.status.split(",")), flags=args.flags, drop_flags=tuple(args.drop_flag or ()))
    report = export_dataset(common.client(), args.dataset, args.format, args.out, shard_rows=args.shard_rows, keep=keep,
                            progress=not args.quiet)
    sizes = report.shard_bytes
    print(json.dumps({"shards_written": report.shards_written, "shards_present": report.shards_present,
                      "shards_waiting": report.shards_waiting, "rows_written": report.rows_written,
                      "bytes_written": report.bytes_written,
                      "shard_bytes": {"min": min(sizes), "max": max(sizes)} if sizes else None, "out": args.out}))
    if report.shards_waiting:
        print(f"{report.shards_waiting} shards wait for rows without an outcome yet: run the same command again "
              "later to write them", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from amodal.config import child_environment
    from workers.main import check_worker, run_worker

    settings = common.settings(args)
    os.environ.update(child_environment(settings))  # the pool processes read their settings from here
    check_worker(args.stage, settings)
    run_worker(args.stage, gpu=args.gpu, concurrency=args.concurrency, loglevel=args.loglevel)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from amodal.config import child_environment
    from workers.launch import WorkerGroup
    from workers.main import check_worker
    from workers.mps import MpsDaemon
    from workers.placement import DEFAULT_COSTS, costs_from_benchmark, gpu_loads, plan

    settings = common.settings(args)
    costs = costs_from_benchmark(common.existing(args.costs, "--costs", folder=False)) if args.costs \
        else DEFAULT_COSTS
    slots = plan(args.gpus, costs, finalize_workers=args.finalize)
    loads = gpu_loads(slots, costs)
    for slot in slots:
        where = "cpu" if slot.gpu is None else f"gpu {slot.gpu} (load {loads[slot.gpu]:.2f} s/image)"
        print(f"{slot.stage:>10}  {where}")
    if args.dry_run:
        return 0
    for stage in sorted({slot.stage for slot in slots}):
        check_worker(stage, settings)
    env = child_environment(settings)
    group = WorkerGroup(env, Path(args.logs))
    group.catch_stop_signals()  # before the daemon and the first worker start, so a stop ends what started
    mps = MpsDaemon(Path(tempfile.mkdtemp(prefix="amodal-mps-")), Path(args.logs) / "mps") if args.mps else None
    if mps:
        mps.start()
        group.env.update(mps.env)  # the workers are the daemon's clients
    try:
        for slot in slots:
            if group.stopping:
                break
            group.start(slot)
        group.supervise()
    finally:
        if mps:
            mps.stop()
            shutil.rmtree(mps.pipe_dir, ignore_errors=True)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from amodal.settings_doc import describe_settings

    docs = describe_settings()
    if args.json:
        for doc in docs:
            print(json.dumps({"name": doc.name, "type": doc.type, "default": doc.default, "meaning": doc.meaning,
                              "section": doc.section}))
        return 0
    width = max(len(doc.name) for doc in docs)
    section = None
    for doc in docs:
        if doc.section != section:
            section = doc.section
            print(f"\n{section}" if section else "")
        print(f"  {doc.name:<{width}}  {doc.type:<5}  {json.dumps(doc.default):<10}  {doc.meaning}")
    print("\npresets (--set preset=NAME; the defaults are the paper's; docs/design.md, \"Departures\", says why)")
    for name, values in PRESETS.items():
        print(f"  {name:<{width}}  {', '.join(f'{k}={json.dumps(v)}' for k, v in values.items()) or '(the defaults)'}")
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from producer.flower import run_flower

    run_flower(args.port)
    return 0


class Parser(argparse.ArgumentParser):
    """A usage mistake in one line, like every other mistake, naming where the help is."""

    def error(self, message: str):
        verb = self.prog.removeprefix("amodal").strip()
        self.exit(2, f"amodal: {verb + ': ' if verb else ''}{message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Marks required options, and shows a default once: where an option has one and its help does not
    already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)"
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) \
                and "default" not in text:
            return f"{text} (default: %(default)s)"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amodal")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_shard_options(parser: argparse.ArgumentParser) -> None:
    from producer.shards import FORMATS, IMAGE_EXTENSIONS

    group = parser.add_argument_group("shards", "reading WebDataset, Parquet or Hugging Face input")
    group.add_argument("--input-format", choices=FORMATS, help="the input's format (default: told from --images)")
    group.add_argument("--query", help="one query for every sample")
    group.add_argument("--query-field", default="query",
                       help="the sample's query (a string or a list): a key of its .json, or a column")
    group.add_argument("--image-field", help="the image: a WebDataset file extension (else the first of "
                       f"{', '.join(IMAGE_EXTENSIONS)} found) or a column (default: image; bytes or relative paths)")
    group.add_argument("--mask-field", help="a visible mask, used where present: a WebDataset extension (default: "
                       "mask.png) or a column")
    group.add_argument("--key-field", default="key", help="Parquet/HF: the column an annotation file names rows by "
                       "(default: the row's index)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="amodal", description="Open-world amodal appearance completion: find an object named by a text "
        "query, repaint what hides it, write the whole object as an RGBA image.",
        epilog="Exit codes: 0 done, 2 bad usage or input, 1 a service that cannot be reached or fails. "
        "AMODAL_DEBUG=1 shows tracebacks.", formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"amodal {_version()}")
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="log lines as text or one JSON object each, for log collectors (this process and "
                             "the workers and dispatcher it starts; default: $AMODAL_LOG_FORMAT, else text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, text: str, more: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=f"{text}. {more}".strip(), formatter_class=HelpFormatter)

    run = verb("run", "run the whole method in this process over an annotation file; results, manifest.jsonl "
                      "and index.html in a local folder")
    run.add_argument("--images", required=True, help="folder the annotation paths are relative to, or shards "
                     "(as for submit; their images are written into OUT/inputs)")
    run.add_argument("--annotations", help="paper-format JSON or JSONL rows (with shards: JSONL whose 'image' names "
                     "a sample's key)")
    run.add_argument("--out", required=True, help="output folder (results, manifest.jsonl, index.html)")
    _add_shard_options(run)
    run.add_argument("--models", help="model folder (default: $AMODAL_MODEL_DIR)")
    run.add_argument("--set", action="append", metavar="NAME=VALUE", help=SET_HELP)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    models = verb("models", "write tiny test checkpoints or fetch the published ones")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    tiny = msub.add_parser("tiny", help="write tiny random-weight checkpoints in the published formats",
                           description="write tiny random-weight checkpoints in the published formats "
                                       "(they check the wiring; their results are noise)")
    tiny.add_argument("dir", help="model folder to write into (created if missing)")
    dl = msub.add_parser("download", help="fetch the published checkpoints",
                         description="fetch the published checkpoints (needs network access)",
                         formatter_class=HelpFormatter)
    dl.add_argument("dir", help="model folder to fetch into (created if missing)")
    dl.add_argument("--only", nargs="+", metavar="MODEL", help="fetch only these models (sam, grounding_dino, clip, "
                    "sd_inpaint, instaorder, ram_plus, lisa, lpips); default: all, LISA-13B included (about 26 GB)")
    dl.add_argument("--sam-variant", default="vit_h", choices=["vit_h", "vit_l", "vit_b"], help="SAM backbone")
    models.set_defaults(func=cmd_models)

    submit = verb("submit", "record one job per (image, query) row of a dataset in the storage; the dispatcher "
                            "(every worker runs one) starts them as the queues drain",
                  "Reads AMODAL_BROKER_URL and AMODAL_STORAGE_URL. Submitting the same file again resumes a "
                  "submission that stopped.")
    submit.add_argument("--images", required=True, help="local folder or s3://bucket/prefix of images, or shards: "
                        "WebDataset tar files ('shards/{00000..00099}.tar', a folder or s3:// prefix of .tar), a "
                        "Parquet file or folder, a Hugging Face dataset saved to disk")
    submit.add_argument("--annotations", help="paper-format JSON or JSONL rows (with shards: JSONL whose 'image' "
                        "names a sample's key)")
    submit.add_argument("--dataset", required=True, help="dataset name (results/<dataset>/...)")
    _add_shard_options(submit)
    submit.add_argument("--set", action="append", metavar="NAME=VALUE", help=SET_HELP)
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(func=cmd_submit)

    status = verb("status", "progress of a submitted dataset (rows per outcome; per stage queued, in work and "
                            "done), its manifest, a results page, or the live workers")
    status.add_argument("--dataset", help="dataset name given to submit (needed unless --workers)")
    status.add_argument("--wait", action="store_true", help="refresh until no row is in flight")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --wait")
    status.add_argument("--stall", type=float, default=60.0,
                        help="with --wait, after this many seconds without any movement say what is missing "
                             "(the dispatcher, a stage's workers) or which workers are live")
    status.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="with --wait, exit 1 after this many seconds without any movement (default: wait on)")
    status.add_argument("--manifest", action="store_true", help="print one JSON line per input row")
    status.add_argument("--flagged", action="store_true", help="with --manifest or --report: only flagged rows")
    status.add_argument("--status", nargs="+", metavar="OUTCOME", choices=[*OUTCOMES, "pending"],
                        help=f"with --manifest or --report: only rows with these outcomes ({', '.join(OUTCOMES)}, "
                             "pending)")
    status.add_argument("--report", metavar="DIR", help="write a results page (DIR/index.html, its further pages "
                                                        "and its images)")
    status.add_argument("--limit", type=int, default=500, metavar="ROWS",
                        help="with --report: the first ROWS rows that match, in row order")
    status.add_argument("--workers", action="store_true", help="list the live workers and their stages")
    status.set_defaults(func=cmd_status)

    export = verb("export", "write a dataset's finished rows as WebDataset or Parquet shards (RGBA completion, "
                            "masks, offsets, prompt, quality, flags, source row); a rerun writes only missing shards")
    export.add_argument("--dataset", required=True, help="dataset name given to submit")
    export.add_argument("--format", required=True, choices=["webdataset", "parquet"], help="shard format")
    export.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    export.add_argument("--shard-rows", type=int, default=1000,
                        help="input rows a shard covers (it holds those that are finished and pass the filters)")
    export.add_argument("--status", default="completed,unoccluded", help="outcomes to export, comma-separated")
    export.add_argument("--flags", default="any", choices=["any", "none", "flagged"],
                        help="rows by flags: all, only those without flags, or only flagged ones")
    export.add_argument("--drop-flag", action="append", metavar="FLAG", help="leave out rows with this flag (repeatable)")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    export.set_defaults(func=cmd_export)


    worker = verb("worker", "run one stage's worker, and the dispatcher's loop beside it",
                  "Reads AMODAL_BROKER_URL, AMODAL_STORAGE_URL and AMODAL_MODEL_DIR. Every worker's dispatcher "
                  "waits on one lock in Redis; one works at a time.")
    worker.add_argument("--stage", required=True, choices=NAMES, help="the stage whose queue it serves")
    worker.add_argument("--gpu", type=int, help="GPU index (sets CUDA_VISIBLE_DEVICES before torch loads); "
                        "default 0 for GPU stages")
    worker.add_argument("--concurrency", type=int,
                        help="pool processes, each holding its models (default: 2 for segment and inpaint, else 1)")
    worker.add_argument("--set", action="append", metavar="NAME=VALUE", help=SET_HELP)
    worker.add_argument("--loglevel", default="info", help="log level")
    worker.set_defaults(func=cmd_worker)

    launch = verb("launch", "start and supervise this host's stage workers by the placement plan")
    launch.add_argument("--gpus", type=int, required=True, help="GPUs on this host")
    launch.add_argument("--costs", help="a bench/gpu_throughput.py record to plan from (default: estimates)")
    launch.add_argument("--finalize", type=int, default=1, help="CPU finalize workers")
    launch.add_argument("--logs", default="logs", help="folder for the workers' logs")
    launch.add_argument("--set", action="append", metavar="NAME=VALUE", help=SET_HELP)
    launch.add_argument("--mps", action="store_true",
                        help="run the GPU workers as clients of a CUDA MPS daemon started here (stages sharing a "
                             "GPU run their kernels together instead of taking turns)")
    launch.add_argument("--dry-run", action="store_true", help="print the plan only")
    launch.set_defaults(func=cmd_launch)

    flower = verb("flower", "serve Flower on the same broker (basic auth from FLOWER_BASIC_AUTH=user:password)")
    flower.add_argument("--port", type=int, default=5555, help="TCP port to serve on")
    flower.set_defaults(func=cmd_flower)

    settings = verb("settings", "list every setting of the method (--set NAME=VALUE, AMODAL_SETTINGS) with its "
                                "type, default and meaning")
    settings.add_argument("--json", action="store_true", help="one JSON object per setting")
    settings.set_defaults(func=cmd_settings)

    from amodal.cli.evaluate import add_eval_command
    from producer.dispatch import add_dispatch_command
    from producer.metrics import add_metrics_command

    add_dispatch_command(sub, HelpFormatter)
    add_eval_command(sub)
    add_metrics_command(sub)
    for name, choice in sub.choices.items():  # every verb: its one-line help is its description at least
        choice.formatter_class = HelpFormatter
        text = next(a.help for a in sub._choices_actions if a.dest == name)
        choice.description = choice.description or f"{text}."
    return parser


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an error a user can act on; None for a bug (shown with its traceback)."""
    from amodal.images import InvalidInput
    from amodal.models.base import MissingCheckpointError
    from amodal.models.download import DownloadError

    if isinstance(exc, (UsageError, ServiceError)):
        return exc.exit_code, str(exc)
    if isinstance(exc, (InvalidInput, MissingCheckpointError)):
        return 2, str(exc)
    if isinstance(exc, DownloadError):
        return 1, str(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return 2, f"cannot use {exc.filename}: {exc.strerror}"
    from producer.checks import explain_service_error

    return explain_service_error(exc)


def _stdout_closed() -> int:
    """The reader of stdout went away (``amodal status --manifest | head -3``): stop quietly, as other
    commands in a pipe do, with 128 + SIGPIPE; what is still buffered goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    from amodal.config import debug_enabled, environment
    from amodal.logs import configure_logging

    args = build_parser().parse_args(argv)
    try:
        if args.log_format:
            os.environ["AMODAL_LOG_FORMAT"] = args.log_format  # the workers and dispatchers it starts log alike
        configure_logging(logging.DEBUG if args.verbose else logging.WARNING,
                          environment().log_format == "json")
        return args.func(args)
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("amodal: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error ends in one line unless AMODAL_DEBUG is set
        known = explain(exc)
        if known is None or debug_enabled():
            raise
        code, line = known
        print(f"amodal: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
