"""The ``amodal`` command."""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
from pathlib import Path

from amodal.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    changes = {}
    for item in args.set or []:
        name, _, value = item.partition("=")
        field_type = type(getattr(Settings(), name, None))
        if name not in Settings.__dataclass_fields__:
            raise SystemExit(f"amodal: unknown setting {name!r}")
        changes[name] = field_type(value) if field_type is not bool else value.lower() in ("1", "true", "yes")
    return Settings(**changes)


def _model_dir(args: argparse.Namespace) -> Path:
    value = args.models or os.environ.get("AMODAL_MODEL_DIR")
    if not value:
        raise SystemExit("amodal: no model folder: pass --models DIR or set AMODAL_MODEL_DIR")
    return Path(value)


def cmd_run(args: argparse.Namespace) -> int:
    from amodal.models.registry import ModelSet
    from amodal.runner import run_local

    settings = _settings(args)
    images, annotations = Path(args.images), Path(args.annotations)
    for path, what in ((images, "--images folder"), (annotations, "--annotations file")):
        if not path.exists():
            raise SystemExit(f"amodal: {what} not found: {path}")
    outcomes = run_local(images, annotations, Path(args.out), ModelSet(_model_dir(args), settings), settings,
                         progress=not args.quiet)
    counts = collections.Counter(o.status for o in outcomes)
    print(json.dumps({"rows": len(outcomes), **counts, "manifest": str(Path(args.out) / "manifest.jsonl")}))
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


def cmd_submit(args: argparse.Namespace) -> int:
    from producer import Client

    report = Client(settings=_settings(args)).submit_dataset(args.images, args.annotations, args.dataset,
                                                             progress=not args.quiet)
    print(json.dumps({"rows": report.rows, "enqueued": report.enqueued, "finished": report.finished,
                      "invalid": len(report.invalid)}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from producer import Client
    from producer.status import show_status

    client = Client()
    if args.manifest:
        for line in client.manifest(args.dataset):
            print(json.dumps(line))
        return 0
    print(json.dumps(show_status(client, args.dataset, wait=args.wait, interval=args.interval)))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run_worker

    run_worker(args.stage, gpu=args.gpu, concurrency=args.concurrency, loglevel=args.loglevel)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from workers.launch import WorkerGroup
    from workers.placement import costs_from_benchmark, gpu_loads, plan, DEFAULT_COSTS

    costs = costs_from_benchmark(Path(args.costs)) if args.costs else DEFAULT_COSTS
    slots = plan(args.gpus, costs, finalize_workers=args.finalize)
    loads = gpu_loads(slots, costs)
    for slot in slots:
        where = "cpu" if slot.gpu is None else f"gpu {slot.gpu} (load {loads[slot.gpu]:.2f} s/image)"
        print(f"{slot.stage:>10}  {where}")
    if args.dry_run:
        return 0
    group = WorkerGroup(dict(os.environ), Path(args.logs))
    for slot in slots:
        group.start(slot)
    group.supervise()
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from producer.flower import run_flower

    run_flower(args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amodal", description="Open-world amodal appearance completion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole method in one process, results in a local folder")
    run.add_argument("--images", required=True, help="folder the annotation paths are relative to")
    run.add_argument("--annotations", required=True, help="paper-format JSON or JSONL rows")
    run.add_argument("--out", required=True, help="output folder (results and manifest.jsonl)")
    run.add_argument("--models", help="model folder (default: $AMODAL_MODEL_DIR)")
    run.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a setting (repeatable)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="fetch or write model checkpoints")
    msub = models.add_subparsers(dest="action", required=True)
    tiny = msub.add_parser("tiny", help="write tiny random-weight checkpoints in the published formats")
    tiny.add_argument("dir")
    dl = msub.add_parser("download", help="fetch the published checkpoints")
    dl.add_argument("dir")
    dl.add_argument("--only", nargs="+", metavar="MODEL", help="fetch only these models (sam, grounding_dino, clip, "
                    "sd_inpaint, instaorder, ram_plus, lisa); default: all, LISA-13B included (about 26 GB)")
    dl.add_argument("--sam-variant", default="vit_h", choices=["vit_h", "vit_l", "vit_b"])
    models.set_defaults(func=cmd_models)

    submit = sub.add_parser("submit", help="enqueue one job per (image, query) row")
    submit.add_argument("--images", required=True, help="local folder or s3://bucket/prefix")
    submit.add_argument("--annotations", required=True, help="paper-format JSON or JSONL rows")
    submit.add_argument("--dataset", required=True, help="dataset name (results/<dataset>/...)")
    submit.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a setting (repeatable)")
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="counts per state of a submitted dataset")
    status.add_argument("--dataset", required=True)
    status.add_argument("--wait", action="store_true", help="refresh until no row is pending")
    status.add_argument("--manifest", action="store_true", help="print one JSON line per input row")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.set_defaults(func=cmd_status)

    worker = sub.add_parser("worker", help="run one stage worker")
    worker.add_argument("--stage", required=True, choices=["ground", "segment", "occlusion", "inpaint", "finalize"])
    worker.add_argument("--gpu", type=int, help="GPU index (sets CUDA_VISIBLE_DEVICES before torch loads)")
    worker.add_argument("--concurrency", type=int,
                        help="pool processes, each holding its models (default: 2 for segment, 1 for the others)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=cmd_worker)

    launch = sub.add_parser("launch", help="start and supervise this host's workers by the placement plan")
    launch.add_argument("--gpus", type=int, required=True, help="GPUs on this host")
    launch.add_argument("--costs", help="a bench/gpu_throughput.py record to plan from (default: estimates)")
    launch.add_argument("--finalize", type=int, default=1, help="CPU finalize workers")
    launch.add_argument("--logs", default="logs", help="folder for the workers' logs")
    launch.add_argument("--dry-run", action="store_true", help="print the plan only")
    launch.set_defaults(func=cmd_launch)

    flower = sub.add_parser("flower", help="Flower on the same broker (basic auth from FLOWER_BASIC_AUTH)")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)
    return parser


def main(argv: list[str] | None = None) -> int:
    from amodal.images import InvalidInput
    from amodal.models.base import MissingCheckpointError
    from amodal.models.download import DownloadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (InvalidInput, MissingCheckpointError, DownloadError) as exc:
        print(f"amodal: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
