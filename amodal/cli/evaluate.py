"""``amodal eval``: rows with known truth, the method run on them (or results made elsewhere), scored beside
the reference methods, and reported."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from amodal.errors import UsageError
from amodal.evaluation import METRICS
from amodal.evaluation.generator import Sample, coco_objects, coco_samples, read_rows, synthetic_samples, write_rows
from amodal.evaluation.options import CROPS, MetricOptions
from amodal.evaluation.summary import FAILURE_RULE, OURS, combine, score_method
from amodal.settings import Settings

# The metrics bring torch: imported where they run, so that `amodal worker`, whose parser holds this
# command too, pins its GPU before anything loads torch.
if TYPE_CHECKING:
    from amodal.evaluation.metrics import Scorer

# The paper's numbers, for comparison (its own data, models and metric choices).
PAPER = {"clip_score": 28.18, "lpips": 0.320, "feature_similarity": 0.646, "ssim": 0.731, "failure_rate": 0.041}

HELP = f"""Quality benchmark. Rows come from --synthetic (striped discs and boxes, part hidden by a pasted
object), --coco (a COCO file's whole objects, part hidden by another's pasted cut-out) or --amodal (real
occlusions of a COCOA, KINS or COCO-style file with visible and amodal masks: the visible mask goes in,
the amodal mask is the truth). `amodal eval score --data DIR --results DIR` scores results made by any
method, laid out as ours (a manifest.jsonl with each row's result folder, or one folder per row name).

Metrics, per row: iou (amodal mask vs the true one), hidden_iou (what the result adds to the visible
part vs the true hidden part; doing nothing scores 0), repainted (fraction of the hidden part covered);
on pastes, where the hidden pixels are known, also ssim, lpips, feature_similarity and clip_score on
the hidden part ({", ".join(METRICS)}). {FAILURE_RULE} Every report scores two reference methods beside
ours on the same rows: doing nothing (the visible cut-out) and mean_fill (the visible mask's convex hull
painted with the mean visible colour).

Tiny random-weight models find no occluders, so every row ends `unoccluded` and inpainting never runs:
force the completion loop with --set fixed_passes=N (N passes whatever the stop rules)."""


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``amodal`` command's subparsers."""
    defaults = MetricOptions()
    parser = subparsers.add_parser("eval", help="quality benchmark: rows with known truth scored beside doing "
                                   "nothing and a trivial fill", description=HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("run", "score"), default="run",
                        help="run: make the rows and run the method on them (default); score: score --results")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", type=int, metavar="N", help="N generated rows per seed")
    source.add_argument("--coco", help="COCO-style file of whole objects (polygon or RLE); needs --images")
    source.add_argument("--amodal", help="COCOA, KINS or COCO-style file with visible and amodal masks; needs --images")
    parser.add_argument("--images", help="folder of the --coco or --amodal file's images")
    parser.add_argument("--limit", type=int, default=200, help="rows drawn from a --coco or --amodal file per seed "
                        "(default 200)")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], metavar="SEED",
                        help="seeds of the rows (and of the method); the report gives the mean over seeds and a "
                             "95%% interval (default 0)")
    parser.add_argument("--out", required=True, help="output folder (rows, results, report.json, index.html)")
    parser.add_argument("--models", help="model folder (default: $AMODAL_MODEL_DIR)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--grounding", choices=("given", "text"), default="given",
                        help="given: the true visible mask goes in (default); text: the method grounds the query "
                             "itself (settings' grounder) and its visible mask is scored too (visible_iou)")
    parser.add_argument("--through-queue", metavar="DATASET",
                        help="submit the rows as this dataset (AMODAL_STORAGE_URL) to running workers and score "
                             "what they stored, instead of running in this process")
    parser.add_argument("--data", help="score: the data folder of an earlier eval (OUT/seed-N/data)")
    parser.add_argument("--results", help="score: the results to score, laid out as ours")
    parser.add_argument("--clip-model", default=defaults.clip_model,
                        help=f"CLIP folder in the model folder for clip_score and feature_similarity (default "
                             f"{defaults.clip_model}, as torchmetrics chooses; Hugging Face format)")
    parser.add_argument("--clip-prompt", default=defaults.clip_prompt,
                        help="clip_score's text, {} the class (default: the class alone, as torchmetrics is given)")
    parser.add_argument("--ssim-sigma", type=float, default=defaults.ssim_sigma,
                        help=f"SSIM's Gaussian window sigma (default {defaults.ssim_sigma})")
    parser.add_argument("--crop", choices=CROPS, default=defaults.crop,
                        help="appearance crop: context (default: the hidden part's box with its true surroundings "
                             "on both sides; a hidden pixel left empty shows the inverse of the truth) or black "
                             "(black around and under both)")
    parser.add_argument("--lpips-min-side", type=int, default=defaults.lpips_min_side,
                        help=f"LPIPS crops smaller than this are scaled up, aspect kept (default {defaults.lpips_min_side})")
    parser.add_argument("--hidden-iou-floor", type=float, default=defaults.hidden_iou_floor,
                        help=f"a row fails when its hidden_iou is under this (default {defaults.hidden_iou_floor})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from amodal.cli import common
    from amodal.evaluation.metrics import Scorer
    from amodal.models.runtime import resolve_device

    settings, model_dir = common.settings(args), common.model_dir(args)
    options = MetricOptions(clip_model=args.clip_model, clip_prompt=args.clip_prompt, ssim_sigma=args.ssim_sigma,
                            crop=args.crop, lpips_min_side=args.lpips_min_side, hidden_iou_floor=args.hidden_iou_floor)
    if "{}" not in options.clip_prompt:
        raise UsageError("--clip-prompt must hold {} where the class goes")
    out = Path(args.out)
    if args.action == "score":
        if not (args.data and args.results):
            raise UsageError("eval score needs --data (an earlier eval's data folder) and --results")
        samples = read_rows(Path(args.data))
        scorer = Scorer.from_model_dir(model_dir, resolve_device(settings.device), options)
        seeds = {0: (samples, result_folders(Path(args.results)))}
        report = evaluate_results(seeds, out, scorer, settings, model_dir, source={"results": args.results},
                                  progress=not args.quiet)
    else:
        seeds_samples = {seed: _samples(args, seed) for seed in args.seeds}
        scorer = Scorer.from_model_dir(model_dir, resolve_device(settings.device), options)
        run = _through_queue(args.through_queue, settings, args.quiet) if args.through_queue \
            else _in_process(model_dir, settings, args.quiet)
        report = evaluate(seeds_samples, out, run, scorer, settings, model_dir, grounding=args.grounding,
                          source=_source(args), progress=not args.quiet)
    print(json.dumps({"failure_rate": {m: s["failure_rate"]["mean"] for m, s in report["methods"].items()},
                      "report": str(out / "report.json"), "page": str(out / "index.html")}))
    return 0


def _source(args: argparse.Namespace) -> dict:
    return {"synthetic": args.synthetic, "coco": args.coco, "amodal": args.amodal, "images": args.images,
            "limit": args.limit, "through_queue": args.through_queue}


def _samples(args: argparse.Namespace, seed: int) -> list[Sample]:
    """The rows of one seed, from the chosen source."""
    if args.synthetic is not None:
        if args.synthetic < 1:
            raise UsageError("--synthetic needs a positive row count")
        return synthetic_samples(args.synthetic, seed)
    if not (args.coco or args.amodal):
        raise UsageError("eval needs a source of rows: --synthetic N, --coco FILE or --amodal FILE")
    if not args.images:
        raise UsageError(f"{'--coco' if args.coco else '--amodal'} needs --images")
    if args.amodal:
        from amodal.evaluation.datasets import amodal_samples

        _, samples = amodal_samples(Path(args.amodal), Path(args.images), args.limit, seed)
    else:
        samples = coco_samples(coco_objects(Path(args.coco), Path(args.images)), args.limit, seed)
    if not samples:
        raise UsageError("no usable objects to evaluate on (occluded or pastable objects with a visible part)")
    return samples


# A way to run the method: (rows file, images folder, output folder, seed) -> manifest lines by input image.
Runner = Callable[[Path, Path, Path, int], dict[str, dict]]


def _in_process(model_dir: Path, settings: Settings, quiet: bool) -> Runner:
    from amodal.models.registry import ModelSet

    models = ModelSet(model_dir, settings)

    def run(images: Path, annotations: Path, folder: Path, seed: int) -> dict[str, dict]:
        return run_in_process(images, annotations, folder, models, settings.replace(seed=seed), progress=not quiet)
    return run


def run_in_process(images: Path, annotations: Path, folder: Path, models, settings: Settings,
                   progress: bool = True) -> dict[str, dict]:
    """The method on every row in this process; its manifest lines by input image."""
    from amodal.runner import run_local

    run_local(images, annotations, folder, models, settings, progress=progress)
    return read_manifest(folder)


def _through_queue(dataset: str, settings: Settings, quiet: bool) -> Runner:
    def run(images: Path, annotations: Path, folder: Path, seed: int) -> dict[str, dict]:
        return run_through_queue(images, annotations, folder, f"{dataset}-seed{seed}", settings.replace(seed=seed),
                                 progress=not quiet)
    return run


def run_through_queue(images: Path, annotations: Path, folder: Path, dataset: str, settings: Settings,
                      progress: bool = True, timeout: float = 3600) -> dict[str, dict]:
    """Submit the rows as ``dataset`` to the running workers, wait for every outcome, copy the stored results
    into ``folder`` (one folder per job) and return the manifest lines by input image."""
    from tqdm import tqdm

    from amodal.cli import common
    from amodal.keys import result_prefix
    from producer.client import PENDING

    client = common.client(settings, writes=True)
    client.submit_dataset(images, annotations, dataset, progress=progress)
    deadline = time.monotonic() + timeout
    with tqdm(desc="workers", unit="row", disable=not progress) as bar:
        while True:
            counts = client.status(dataset)
            bar.total, bar.n = counts["total"], counts["total"] - counts[PENDING]
            bar.refresh()
            if not counts[PENDING]:
                break
            if time.monotonic() > deadline:
                raise UsageError(f"dataset {dataset}: rows still pending after {timeout:.0f} s (are workers running?)")
            time.sleep(1)
    lines = {}
    for line in client.manifest(dataset):
        lines[line["image"]] = line
        if line["result"]:  # copied by key below the result's prefix (a result may hold sub-folders)
            prefix, target = result_prefix(dataset, line["job_id"]) + "/", folder / line["job_id"]
            for key in client.store.list(prefix):
                path = target / key.removeprefix(prefix)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(client.store.get(key))
            line["result"] = str(target)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines.values()))
    return lines


def read_manifest(run: Path) -> dict[str, dict]:
    """The manifest's lines by input image."""
    lines = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    return {line["image"]: line for line in lines}


def result_folders(results: Path) -> dict[str, dict]:
    """Manifest-like lines by input image of results laid out as ours: ``manifest.jsonl`` (its ``result``
    folders), else one folder per row name."""
    if not results.is_dir():
        raise UsageError(f"--results: no such folder: {results}")
    if (results / "manifest.jsonl").is_file():
        return read_manifest(results)
    return {f"{folder.name}.png": {"image": f"{folder.name}.png", "status": "completed", "message": "",
                                   "result": str(folder), "flags": []}
            for folder in sorted(results.iterdir()) if folder.is_dir()}


def evaluate(seeds: dict[int, list[Sample]], out: Path, run: Runner, scorer: Scorer, settings: Settings,
             model_dir: Path | None, grounding: str = "given", source: dict | None = None,
             progress: bool = True) -> dict:
    """For each seed: write its rows, run the method on them; then score it beside the reference methods and
    write the report and page into ``out``."""
    runs = {}
    for seed, samples in seeds.items():
        folder = out / f"seed-{seed}"
        # 1. The rows: input images (with the true visible masks unless the method grounds the query), truth.
        images, annotations = write_rows(samples, folder / "data", give_visible=grounding == "given")
        # 2. The method on every row.
        runs[seed] = (samples, run(images, annotations, folder / "run", seed))
    return evaluate_results(runs, out, scorer, settings, model_dir, grounding, source, progress)


def evaluate_results(runs: dict[int, tuple[list[Sample], dict[str, dict]]], out: Path, scorer: Scorer,
                     settings: Settings, model_dir: Path | None, grounding: str = "given",
                     source: dict | None = None, progress: bool = True) -> dict:
    """Score each seed's results (manifest lines by input image) and the reference methods on its rows; write
    ``report.json`` and ``index.html`` into ``out``."""
    from amodal.evaluation.references import write_references
    from amodal.evaluation.report import write_report
    from amodal.evaluation.summary import provenance

    scored: dict[int, dict[str, list[dict]]] = {}
    for seed, (samples, lines) in runs.items():
        # 3. The reference methods' results, and every method's scores.
        references = write_references(samples, out / f"seed-{seed}" / "references")
        ours = {s.name: lines.get(f"{s.name}.png") for s in samples}
        scored[seed] = {OURS: score_method(samples, ours, scorer, grounding, progress)}
        for method, folders in references.items():
            lines_of = {name: {"status": "completed", "message": "", "result": str(folder), "flags": []}
                        for name, folder in folders.items()}
            scored[seed][method] = score_method(samples, lines_of, scorer, "given", progress=False)
    # 4. The summary over seeds, bins and flags, and the report and page.
    report = {**combine(scored, scorer.options.hidden_iou_floor),
              "paper": PAPER, "provenance": provenance(settings, model_dir, scorer.options, grounding, source or {}),
              "rows": {str(seed): methods for seed, methods in scored.items()}}
    write_report(report, {seed: samples for seed, (samples, _) in runs.items()}, out)
    return report
