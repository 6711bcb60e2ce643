"""`srdiff` command line: demo, run, serve, restore, promote, ui, compare, verify-shards. Thin: parsing and printing only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.args import add_config_args, resolve_config  # noqa: F401 (resolve_config re-exported)
from flows.ui import serve_until_signal, ui_command, ui_store  # noqa: F401 (re-exported)

DEMO_CONFIG = "configs/demo.yaml"


def _split_list(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def results_table(summary: dict) -> str:
    """Per degradation: LQ input vs restored PSNR/SSIM (and PSNR-Y, LPIPS where present)."""
    ev = summary["stages"].get("evaluate")
    if ev is None:
        return "(no evaluation in this run)"
    m = ev["metrics"]
    degs = sorted({k.split("/")[1] for k in m if k.startswith("eval/") and k.count("/") == 2} - {"all"}) + ["all"]
    has_lpips = any(k.endswith("/lpips") for k in m)
    cols = ["degradation", "images", "LQ PSNR", "PSNR", "LQ SSIM", "SSIM", "LQ PSNR-Y", "PSNR-Y"]
    cols += ["LQ LPIPS", "LPIPS"] if has_lpips else []
    rows = []
    for d in degs:
        g = lambda k, p=2: f"{m[f'eval/{d}/{k}']:.{p}f}" if f"eval/{d}/{k}" in m else "n/a"  # noqa: E731
        row = [d, g("images", 0), g("lq_psnr"), g("psnr"), g("lq_ssim", 4), g("ssim", 4), g("lq_psnr_y"),
               g("psnr_y")]
        rows.append(row + ([g("lq_lpips", 4), g("lpips", 4)] if has_lpips else []))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if not has_lpips:
        out.append("LPIPS: unavailable (AlexNet backbone weights not in the torch hub cache; see docs/protocol.md)")
    return "\n".join(out)


def stage_lines(summary: dict) -> str:
    return "\n".join(f"  {stage:<9} {'reused (cache) from' if s['reused'] else 'ran in':<19} mlflow run {s['run_id']}"
                     for stage, s in summary["stages"].items())


def from_overrides(config_path: str, overrides: list[str], given: list[str]) -> list[str]:
    """`--from [DATASET=]PATH` (repeatable) as one download.from_paths override; a bare PATH is
    recognised by the file names inside it. A path that does not exist or a dataset the catalog
    does not have fails here, before Prefect starts (a ConfigError: `srdiff: ...`, exit 2)."""
    if not given:
        return overrides
    from srdiff_core.config import ConfigError, load_config
    from tasks import acquire, datasets
    cfg = load_config(config_path, overrides)
    paths: dict[str, list[str]] = {k: list(v) for k, v in cfg.download.from_paths.items()}
    for item in given:
        name, _, raw = item.partition("=") if "=" in item and not Path(item).exists() else ("", "", item)
        path = Path(raw).expanduser()
        try:
            if not name:
                name = acquire.detect_dataset(cfg, path)
            elif not path.exists():
                raise acquire.BadInput(f"--from {name}={path}: no such file or folder; check the path (quote "
                                       "it when it has spaces or brackets)")
        except acquire.DatasetError as e:
            raise ConfigError(str(e)) from e
        catalog = datasets.load_catalog(datasets.resolve_catalog(cfg.download.datasets_file))
        if name not in catalog:
            raise ConfigError(f"--from {name}={path}: the catalog {cfg.download.datasets_file} has no dataset "
                              f"{name!r}; write one of {sorted(catalog)} before '=', or leave 'DATASET=' out to "
                              "have it recognised")
        paths.setdefault(name, []).append(str(path.resolve()))
    return [*overrides, f"download.from_paths={json.dumps(paths)}"]


def check_stage_names(stages: list[str] | None, refresh: list[str]) -> None:
    """Bad --stages / --refresh names fail here, before Prefect starts (flows/stages.py names them)."""
    from flows.stages import unknown
    from srdiff_core.config import ConfigError

    for names, what in ((stages or [], "--stages"), (refresh, "--refresh")):
        if (error := unknown(names, f"stage(s) in {what}")) is not None:
            raise ConfigError(str(error))


def run_log_folder(cfg) -> Path:
    """data_root/logs for a local data root (else the user's cache folder), checked writable."""
    from srdiff_core.config import ConfigError
    from tasks.common import data_root

    root = data_root(cfg)
    folder = Path.home() / ".cache" / "srdiff" / "logs" if "://" in root else Path(root) / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write under data_root {root} ({e.strerror or e}); choose a folder you can "
                          f"write with --set data_root=PATH") from None
    return folder


def cmd_run(args: argparse.Namespace) -> int:
    import traceback

    from flows import console, interrupt
    from srdiff_core.config import load_config
    from srdiff_core.config import random_clip_weights
    from tasks.common import RANDOM_WEIGHTS_NOTE
    from tasks.tracking import tracking_uri

    config_path = resolve_config(args.config)
    args.set = from_overrides(config_path, args.set, getattr(args, "from_paths", None) or [])
    cfg = load_config(config_path, args.set)  # fail fast on a bad config, before Prefect starts
    stages, refresh = _split_list(args.stages), _split_list(args.refresh) or []
    check_stage_names(stages, refresh)
    verbose = getattr(args, "verbose", False)
    with console.run_log(run_log_folder(cfg), quiet=not verbose) as log_path, interrupt.handled_signals():
        interrupt.start_guarded_prefect_server()
        from flows.pipeline import srdiff  # after the handlers: importing the stages takes a while

        try:
            summary = srdiff(config_path=config_path, overrides=args.set, stages=stages, refresh=refresh)
        except Exception as e:
            if verbose:
                traceback.print_exc()
            where = f"the traceback is in {log_path}" + ("" if verbose else " (--verbose prints it here)")
            print(f"srdiff: {e}\n  ({type(e).__name__}; {where})", file=sys.stderr)
            return 2 if console.is_user_error(e) else 1
    print("\nstages:\n" + stage_lines(summary))
    print("\nresults (one seeded sample per image; PSNR/SSIM on RGB with a "
          f"{cfg.evaluate.crop_border}-px border crop):\n" + results_table(summary))
    if random_clip_weights(cfg.embed.pretrained):
        print(f"\nnote: {RANDOM_WEIGHTS_NOTE}")
    print(f"\nMLflow parent run {summary['parent_run_id']}. Open the UI on these runs with:\n"
          f"  {ui_command(args.config, args.set)}\n"
          f"  (or: mlflow ui --backend-store-uri {tracking_uri(cfg)} --port 5000)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.config, args.stages, args.refresh, args.from_paths = DEMO_CONFIG, None, None, []
    return cmd_run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_all
    from flows.stages import STAGE_NAMES
    from srdiff_core.config import load_config

    config_path = resolve_config(args.config)
    load_config(config_path, args.set)  # a bad config fails here, not in every deployment run
    print(f"serving srdiff/full-pipeline and srdiff/{{{','.join(STAGE_NAMES)}}}; "
          "run one with `prefect deployment run srdiff/full-pipeline`", flush=True)
    serve_all(config_path, args.set)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from srdiff_core.config import load_config
    from tasks.tracking import mlflow_server_command

    cfg = load_config(resolve_config(args.config), args.set)
    uri = ui_store(cfg)
    print(f"MLflow UI on {uri}: http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    return serve_until_signal(mlflow_server_command(cfg, args.port))


def cmd_compare(args: argparse.Namespace) -> int:
    from srdiff_core.config import load_config
    from tasks.compare import CompareError, compare, open_store, parse_metrics

    cfg = load_config(resolve_config(args.config), args.set)
    try:
        print(compare(open_store(cfg), args.runs, metrics=parse_metrics(args.metrics), fmt=args.format))
    except CompareError as e:
        print(f"srdiff compare: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from flows.restore import RestoreError, restore_path
    try:
        return restore_path(args.input, args.output, checkpoint=args.checkpoint,
                            config_path=resolve_config(args.config), overrides=args.set, steps=args.steps,
                            seed=args.seed, tile_size=args.tile_size, device=args.device,
                            clip_pretrained=args.clip_pretrained, clip_x0=args.clip_x0)
    except RestoreError as e:  # input, output, --steps, --tile-size: found before the restoration ran
        print(f"srdiff restore: {e}", file=sys.stderr)
        return 2


def cmd_promote(args: argparse.Namespace) -> int:
    from srdiff_core.config import load_config
    from tasks.registry import RegistryError, promote

    cfg = load_config(resolve_config(args.config), args.set)
    name = args.name or cfg.tracking.registered_model
    try:
        version = promote(cfg, args.version, args.alias, name)
    except RegistryError as e:
        print(f"srdiff promote: {e}", file=sys.stderr)
        return 1
    print(f"models:/{name}@{args.alias} -> version {version.version} (MLflow run {version.run_id}); restore with "
          f"`srdiff restore IN OUT --checkpoint models:/{name}@{args.alias}`")
    return 0


def cmd_verify_shards(args: argparse.Namespace) -> int:
    from storage.shards import ShardVerificationError, verify_shards
    from storage.tables import UnreadableTable
    from tasks.advice import with_advice

    try:
        verify_shards(args.shards)
    except (ShardVerificationError, FileNotFoundError, UnreadableTable) as e:
        print(f"srdiff verify-shards: {with_advice(e)}", file=sys.stderr)
        return 1
    print(f"{args.shards}: every shard matches index.parquet")
    return 0


def cmd_import_embeddings(args: argparse.Namespace) -> int:
    """The original SR-Diff per-image layout (<id>.pt files) as one of our embedding tables."""
    from storage import tables
    from tasks.advice import with_advice
    from tasks.pt_layout import import_pt_layout

    try:
        samples = None
        if args.manifest:
            samples = tables.read_table(args.manifest, hint="the download stage (`srdiff run --stages download`, which writes data_root/manifests/pairs.parquet)")
        table = import_pt_layout(args.folder, samples=samples,
                                 metadata={"imported_from": str(args.folder), "weights": "unknown (imported)"})
    except (FileNotFoundError, ValueError) as e:
        print(f"srdiff import-embeddings: {with_advice(e)}", file=sys.stderr)
        return 1
    tables.write_table(args.output, table)
    dim = table.schema.field("embedding").type.list_size
    unlabelled = "" if samples is not None else " (no --manifest: split and degradation are empty)"
    print(f"imported {table.num_rows} embeddings of size {dim} from {args.folder} -> {args.output}"
          f"{unlabelled}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srdiff", description="SR-Diff: semantic-guided diffusion restoration")
    sub = parser.add_subparsers(dest="command", required=True)

    with_config = add_config_args
    demo = with_config(sub.add_parser("demo", help="the whole pipeline on the embedded demo set"), DEMO_CONFIG)
    demo.add_argument("--verbose", action="store_true", help="print tracebacks on the console too")
    demo.set_defaults(func=cmd_demo)
    run = with_config(sub.add_parser("run", help="run the pipeline or some of its stages"))
    # The stage names are flows/stages.py's (a test checks): importing it here would load every task.
    run.add_argument("--stages", help="comma-separated stages to run (upstream ones come from cache): "
                                      "download,shard,embed,train,evaluate")
    run.add_argument("--refresh", help="comma-separated stages to recompute even when cached")
    run.add_argument("--from", dest="from_paths", action="append", default=[], metavar="[DATASET=]PATH",
                     help="use an archive or extracted folder you already have for a real dataset instead "
                          "of downloading it, e.g. --from lol=~/LOLdataset.zip (repeatable; without "
                          "DATASET= the dataset is recognised from the file names inside)")
    run.add_argument("--verbose", action="store_true",
                     help="print tracebacks on the console too (they are always in data_root/logs/)")
    run.set_defaults(func=cmd_run)
    serve = with_config(sub.add_parser("serve", help="serve the deployments full-pipeline and one per stage"))
    serve.set_defaults(func=cmd_serve)
    ui = with_config(sub.add_parser("ui", help="start the MLflow UI on the pipeline's run store (pass the "
                                               "--config and --set data_root=... of the runs)"))
    ui.add_argument("--port", type=int, default=5000, help="on 127.0.0.1 (default: %(default)s)")
    ui.set_defaults(func=cmd_ui)
    compare = with_config(sub.add_parser("compare", help="per-degradation metrics of MLflow runs side by side"))
    compare.add_argument("runs", nargs="+", metavar="RUN_ID",
                         help="two or more pipeline (parent) or evaluate run ids; the first is the reference")
    compare.add_argument("--metrics", help="comma-separated metrics (default: psnr,ssim,psnr_y and lpips if logged)")
    compare.add_argument("--format", choices=("text", "markdown"), default="text")
    compare.set_defaults(func=cmd_compare)
    restore = with_config(sub.add_parser("restore", help="restore an image or a folder of images"))
    restore.add_argument("input")
    restore.add_argument("output")
    restore.add_argument("--checkpoint", required=True,
                         help="a model.pt path, an MLflow run id of a train run, or a registered model version: "
                              "models:/srdiff/<version> or models:/srdiff@<alias>")
    restore.add_argument("--steps", type=int, default=None,
                         help="posterior steps, at least 1 (default: evaluate.steps); fewer are faster")
    restore.add_argument("--seed", type=int, default=0)
    restore.add_argument("--tile-size", type=int, default=None,
                         help="restore images in tiles of this many pixels, 0: whole (default: evaluate.tile_size; "
                              "on the CPU, images over evaluate.cpu_large_pixels in evaluate.cpu_tile_size tiles)")
    restore.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                         help="clamp the sampler's x0 estimate to [0, 1] (default: evaluate.clip_x0)")
    restore.add_argument("--device", default="auto")
    restore.add_argument("--clip-pretrained", default=None, metavar="WEIGHTS",
                         help="where the CLIP weights come from (a tag, a local file, local-dir:PATH); default: what "
                              "the model file records. They must be the weights the model was trained with")
    restore.set_defaults(func=cmd_restore)
    promote = with_config(sub.add_parser("promote", help="point an alias of the registered model at a version"))
    promote.add_argument("version", help="the registered model version, e.g. 3")
    promote.add_argument("--alias", required=True, help="e.g. champion (then: --checkpoint models:/srdiff@champion)")
    promote.add_argument("--name", default=None, help="the registered model (default: tracking.registered_model)")
    promote.set_defaults(func=cmd_promote)
    verify = sub.add_parser("verify-shards", help="re-read every shard and check it against its index")
    verify.add_argument("shards", help="a shard folder, e.g. data/shards/<key>")
    verify.set_defaults(func=cmd_verify_shards)
    imp = sub.add_parser("import-embeddings",
                         help="turn an SR-Diff per-image export (LQCLS/ or RestoreCLS/ of <id>.pt files) into an "
                              "embedding table, e.g. for flows/train_ddp.py --restorecls")
    imp.add_argument("folder", help="the folder of <id>.pt files (ids with '/' in subfolders)")
    imp.add_argument("output", help="the Parquet table to write, e.g. restorecls.parquet")
    imp.add_argument("--manifest", help="the pairs manifest the embeddings belong to (fills split and degradation, "
                                        "and refuses ids it does not hold)")
    imp.set_defaults(func=cmd_import_embeddings)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    from srdiff_core.config import ConfigError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"srdiff: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
