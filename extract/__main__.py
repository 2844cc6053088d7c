"""Command line: `python -m extract run|merge|info ...` (see `python -m extract COMMAND --help`)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from data import args as args_types
from data.cache import CacheError, inspect, read_attrs, read_cache, verify

EXAMPLES = """examples:
  python -m extract run --folder imgs/ --model ViT-B-32-quickgelu --pretrained ~/weights/ViT-B-32.pt --out c.h5
  python -m extract run --folder imgs/ --model hf-hub:apple/DFN2B-CLIP-ViT-B-16 --out c.h5
  python -m extract run --split-json split_zhou_OxfordPets.json --image-root pets/images --model RN50 \\
      --pretrained openai --aug-views 10 --out pets.h5
  python -m extract run --dataset dtd --data-root ~/data --model ViT-B-16 --pretrained openai --out dtd.h5
  python -m extract run --dataset imagenet --data-root ~/data --model RN50 --pretrained openai \\
      --pool-seeds 1 2 3 --pool-shots 16 --aug-views 10 --out imagenet.h5 --dry-run   # what it would encode
  python -m extract run --folder new_imgs/ --unlabelled --classes-from dtd.h5 --model ViT-B-16 --pretrained openai \\
      --out new.h5   # images to classify: python -m train_jax predict --cache new.h5 ...
  torchrun --nproc-per-node 4 -m extract run ... --shard auto --out c.h5   # then:
  python -m extract merge c.h5 c.shard-*-of-4.h5
  python -m extract info c.h5"""


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is no default or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if action.default is None or "default" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of all three commands."""
    parser = argparse.ArgumentParser(prog="python -m extract", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Encode images and prompt texts once with a frozen open_clip model "
                                                 "into an HDF5 feature cache (schema: README.md, 'Cache schema').")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="extract features of a dataset into a cache",
                              formatter_class=_HelpWithDefaults,
                              description="Extract L2-normalised image features of every split (plus augmented "
                                          "views of train) and text features of every class x template. With "
                                          "--pool-shots, only the train images that the few-shot draws of "
                                          "--pool-seeds at up to --pool-shots shots can use are encoded (all are "
                                          "listed); rerun with more seeds or shots to add the missing ones. Writes "
                                          "OUT.partial and renames it to OUT when done; rerun the same command to "
                                          "resume an interrupted run.")
    src = run.add_argument_group("dataset (give exactly one of --folder, --split-json, --dataset)")
    src.add_argument("--folder", type=Path, help="image folder: one sub-folder per class, or train/ val/ test/ "
                                                 "sub-folders of those")
    src.add_argument("--split-json", type=Path, help="CoOp split file split_zhou_<Name>.json "
                                                     "(train/val/test lists of [relpath, label, classname])")
    src.add_argument("--image-root", type=Path, help="folder the --split-json image paths are relative to")
    src.add_argument("--dataset", help="a benchmark defined in data/ (python -m data list)")
    src.add_argument("--data-root", type=Path, help="folder holding the --dataset benchmark's files")
    src.add_argument("--classnames", type=Path, help="--folder only: class-name list, one line per class "
                                                     "('folder<TAB>name', 'folder name', or names in sorted folder "
                                                     "order); labels follow the file order. With --unlabelled: "
                                                     "class names, one a line")
    src.add_argument("--unlabelled", action="store_true",
                     help="--folder holds images to classify (any layout, searched recursively): one split of "
                          "label -1 rows; the classes come from --classes-from or --classnames")
    src.add_argument("--classes-from", type=Path, help="--unlabelled: the training cache whose class names and "
                                                       "templates to use, so the prototypes match the trained run")
    src.add_argument("--split-name", default="test", help="--unlabelled: name of the split the images go to")
    src.add_argument("--split-ratio", default="0.5,0.2,0.3", help="--folder without train/ val/ test/: "
                                                                  "train,val,test fractions of each class")
    src.add_argument("--split-seed", type=args_types.seed, default=1,
                     help="--folder without train/ val/ test/: seed of the per-class split")
    src.add_argument("--name", help="dataset name stored in the cache (default: folder name, split-file name "
                                    "or benchmark name)")
    src.add_argument("--splits", help="comma-separated splits to extract (default: all the dataset has)")
    prompts = run.add_argument_group("prompts")
    prompts.add_argument("--template", help="the dataset's own template, stored first (default: the benchmark's, "
                                            "else 'a photo of a {}.'); the 7-template ImageNet ensemble follows")
    prompts.add_argument("--templates-file", type=Path, help="extra templates, one per line with '{}' for the "
                                                             "class name, stored after the ensemble")
    model = run.add_argument_group("model")
    model.add_argument("--model", default="", help="open_clip model name, e.g. ViT-B-32, RN50, ViT-B-32-quickgelu "
                                                   "(python -c 'import open_clip; print(open_clip.list_models())'), "
                                                   "or hf-hub:ORG/REPO or local-dir:FOLDER (a folder with "
                                                   "open_clip_config.json and the weights)")
    model.add_argument("--pretrained", default="",
                       help="with a built-in model name (required then): open_clip pretrained tag (e.g. openai, "
                            "laion2b_s34b_b79k), a local weights file (state_dict .pt/.bin/.safetensors, or OpenAI's "
                            "TorchScript RN50.pt, ViT-B-32.pt, ...), or 'random' for random init (tests, demos); "
                            "OpenAI's weights always get QuickGELU")
    model.add_argument("--model-config", type=Path, help="open_clip model-config JSON of a custom architecture; "
                                                         "its file name is the model name unless --model is given")
    model.add_argument("--sha256", default="", help="expected sha256 of the --pretrained weights file")
    model.add_argument("--hub-cache", help="download folder for pretrained tags (default: the Hugging Face cache)")
    feats = run.add_argument_group("features")
    feats.add_argument("--aug-views", type=args_types.count, default=0, help="augmented views per train image "
                                                                "(RandomResizedCrop scale 0.5-1 + flip; Tip-Adapter "
                                                                "uses 10)")
    feats.add_argument("--aug-seed", type=args_types.seed, default=0, help="seed of the augmented views")
    feats.add_argument("--pool-shots", type=int, help="encode only the train images that few-shot draws at up to "
                                                      "this many shots (and their validation, when there is no val "
                                                      "split) can use; default: the whole train split")
    feats.add_argument("--pool-seeds", type=args_types.seed, nargs="+",
                       help="with --pool-shots: the seeds whose draws are encoded (default: 1 2 3)")
    feats.add_argument("--float16", action="store_true", help="store image features as float16 (half the size)")
    feats.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them in the cache's "
                                                               "/bad (default: stop at the first one)")
    exe = run.add_argument_group("execution")
    exe.add_argument("--out", type=Path, required=True, help="cache file to write, e.g. cache/dtd-vitb32.h5")
    exe.add_argument("--overwrite", action="store_true", help="replace an existing --out cache made with another "
                                                              "model, setting or image listing (default: refuse)")
    exe.add_argument("--batch-size", type=args_types.positive_int, default=64, help="images per forward pass")
    exe.add_argument("--workers", type=_workers, default=min(8, _cpus()), help="DataLoader worker processes "
                                                                          "(0 = load in the main process)")
    exe.add_argument("--device", default="auto", help="'auto' (CUDA with fp16 autocast when present, else CPU), "
                                                      "'cpu', 'cuda' or 'cuda:N'")
    exe.add_argument("--shard", help="'i/N': extract only slice i of N (0-based) of every split into "
                                     "OUT-stem.shard-i-of-N.h5, for N processes or GPUs; 'auto' reads torchrun's "
                                     "RANK/WORLD_SIZE. Join the shards with `merge`")
    exe.add_argument("--no-progress", action="store_true", help="no progress bar")
    exe.add_argument("--dry-run", action="store_true", help="check what a run checks, print per split how many "
                                                            "images would be encoded, and stop (encodes nothing; "
                                                            "loads the model only to check an existing --out)")
    exe.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object "
                                                         "(target, pool, splits: listed / to_encode / in_file / "
                                                         "forwards, to_encode: the total, views: asked / in_file, "
                                                         "refused: why the run would stop, or null)")
    merge = commands.add_parser("merge", help="join shard caches into one cache",
                                description="Check that the shards come from one extraction (same model and "
                                            "settings, every row exactly once) and write them as one cache.")
    merge.add_argument("out", type=Path, help="merged cache file to write")
    merge.add_argument("shards", type=Path, nargs="+", help="every shard file (X.shard-i-of-N.h5) once")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = commands.add_parser("info", help="print a summary of a cache (or of its .partial while being written)")
    info.add_argument("cache", type=Path, help="cache file (.h5 or .h5.partial)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with `error: ...` on bad input, 130 when interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = ["python", "-m", "extract", *argv]
    from data.errors import DataError
    from extract.errors import ExtractError

    try:
        if args.command == "run":
            path = _run(args)
            if path is not None:
                print(f"wrote {path}")
        elif args.command == "merge":
            from extract.shards import merge_shards

            print(f"wrote {merge_shards(args.out, args.shards, progress=not args.no_progress)}")
        else:
            print(summary(args.cache))
    except (ExtractError, CacheError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are kept in the .partial file; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def _run(args: argparse.Namespace) -> Path | None:
    """The `run` command: check every input, load the model, extract (None for --dry-run, which only plans)."""
    from extract import datasets
    from extract.errors import ExtractError
    from data.cache import partial_path
    from extract.models import resolve_device
    from extract.prompts import cache_templates, check_template, read_templates_file
    from extract.run import check_target, plan, plan_text, run_extraction
    from extract.shards import parse_shard, shard_path

    given = [n for n, v in (("--folder", args.folder), ("--split-json", args.split_json),
                            ("--dataset", args.dataset)) if v is not None]
    if len(given) != 1:
        raise ExtractError(f"give exactly one of --folder, --split-json, --dataset (got {', '.join(given) or 'none'})")
    if args.classnames is not None and args.folder is None:
        raise ExtractError("--classnames applies to --folder only (split files and benchmarks name their classes)")
    if (args.unlabelled and args.folder is None) or (args.classes_from is not None and not args.unlabelled):
        raise ExtractError("--unlabelled applies to --folder, and --classes-from to --unlabelled")
    if args.classes_from is not None and (args.template or args.templates_file):
        raise ExtractError("--classes-from takes the templates of that cache; drop --template and --templates-file")
    template = check_template(args.template, "--template") if args.template else None
    if args.unlabelled:
        spec = datasets.from_unlabelled(args.folder, classes_from=args.classes_from, classnames_file=args.classnames,
                                        template=template or datasets.DEFAULT_TEMPLATE, split=args.split_name,
                                        name=args.name)
    elif args.folder is not None:
        ratio = _ratio(args.split_ratio)
        spec = datasets.from_folder(args.folder, split_ratio=ratio, seed=args.split_seed,
                                    classnames_file=args.classnames, name=args.name,
                                    template=template or datasets.DEFAULT_TEMPLATE)
    elif args.split_json is not None:
        if args.image_root is None:
            raise ExtractError("--split-json needs --image-root, the folder its image paths are relative to")
        spec = datasets.from_split_json(args.split_json, args.image_root, name=args.name,
                                        template=template or datasets.DEFAULT_TEMPLATE)
    else:
        if args.data_root is None:
            raise ExtractError("--dataset needs --data-root, the folder holding the benchmark's files")
        spec = datasets.from_registry(args.dataset, args.data_root)
        if template or args.name:
            spec = datasets.DatasetSpec(args.name or spec.name, spec.image_root, spec.classnames,
                                        (template,) if template else spec.templates, spec.splits)
    user = read_templates_file(args.templates_file) if args.templates_file else []
    templates = list(spec.templates) if args.classes_from else cache_templates(spec.templates, user)
    shard = parse_shard(args.shard) if args.shard else None
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    pool = _pool(args.pool_seeds, args.pool_shots)
    if args.json and not args.dry_run:
        raise ExtractError("--json goes with --dry-run (it prints the plan as JSON)")
    device = resolve_device(args.device)
    feature_dtype = "float16" if args.float16 else "float32"
    if args.dry_run:  # a run's checks, reading only: a refusal is one error line (with --json: the plan's "refused")
        planned = plan(spec, args.out, splits=splits, pool=pool, aug_views=args.aug_views, shard=shard,
                       overwrite=args.overwrite)
        target = shard_path(args.out, shard)
        if not planned["refused"] and (target.exists() or partial_path(target).exists()):
            loaded = _load(args, device)  # only when an existing file must match the model
            try:
                check_target(spec, loaded, args.out, templates=templates, splits=splits, pool=pool,
                             aug_views=args.aug_views, aug_seed=args.aug_seed, feature_dtype=feature_dtype,
                             shard=shard, overwrite=args.overwrite)
            except (ExtractError, CacheError) as e:
                planned["refused"] = str(e)
        if planned["refused"] and not args.json:
            raise ExtractError(planned["refused"])
        print(json.dumps(planned) if args.json else plan_text(planned))
        return None
    loaded = _load(args, device)
    return run_extraction(spec, loaded, args.out, templates=templates, splits=splits, pool=pool,
                          aug_views=args.aug_views, aug_seed=args.aug_seed, batch_size=args.batch_size,
                          workers=args.workers, feature_dtype=feature_dtype, skip_bad=args.skip_bad, shard=shard,
                          device=device, progress=not args.no_progress, command=args.argv, overwrite=args.overwrite)


def _load(args: argparse.Namespace, device: str):
    """The --model with its --pretrained weights (extract.models.LoadedModel)."""
    from extract.errors import ExtractError
    from extract.models import load_model

    if not args.model and args.model_config is None:
        raise ExtractError("--model is required (or --model-config FILE.json for a custom architecture)")
    return load_model(args.model, args.pretrained, model_config=args.model_config, device=device,
                      sha256=args.sha256, cache_dir=args.hub_cache)


def _pool(seeds: list[int] | None, shots: int | None) -> dict | None:
    """--pool-seeds/--pool-shots as the extraction's pool (None: the whole train split)."""
    from extract.errors import ExtractError

    if shots is None:
        if seeds is not None:
            raise ExtractError("--pool-seeds needs --pool-shots K (the most shots the seeds will be run with)")
        return None
    if shots < 1:
        raise ExtractError(f"--pool-shots {shots}: use a number of shots >= 1 (or leave it out to encode all)")
    return {"seeds": sorted(set(seeds or [1, 2, 3])), "shots": shots}


def _ratio(text: str) -> tuple[float, float, float]:
    from extract.errors import ExtractError

    try:
        train, val, test = (float(x) for x in text.split(","))
    except ValueError:
        raise ExtractError(f"--split-ratio {text!r}: expected three fractions train,val,test, e.g. 0.5,0.2,0.3") \
            from None
    if not all(math.isfinite(x) for x in (train, val, test)):
        raise ExtractError(f"--split-ratio {text!r}: expected three finite fractions train,val,test, e.g. 0.5,0.2,0.3")
    return train, val, test


def _workers(text: str) -> int:
    """--workers: 0 to max(8, 2 x the CPUs) DataLoader processes (more only compete for the same cores)."""
    value, most = args_types.count(text), max(8, 2 * _cpus())
    if value > most:
        raise argparse.ArgumentTypeError(f"{value}: use at most {most} worker processes (2 per CPU here)")
    return value


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def summary(path: Path) -> str:
    """Human-readable summary of a cache or a .partial file: attributes, classes, templates, rows per split; the
    checksums of every dataset are verified (CacheError naming the damaged dataset and rows)."""
    read_attrs(path)  # one-line errors for a missing file, a folder, a file being written
    checksummed = verify(path)  # first: names the dataset and rows of a damaged chunk
    info = inspect(path)
    attrs = info["attrs"]
    lines = [f"{path}: {'complete' if attrs.get('complete') else 'INCOMPLETE (resume by rerunning the extraction)'}"]
    for key in ("dataset", "model", "pretrained", "weights_sha256", "embed_dim", "activation", "logit_scale",
                "logit_bias", "feature_dtype", "aug_views", "aug_seed", "shard", "created"):
        lines.append(f"  {key}: {attrs.get(key)!r}")
    lines.append(f"  preprocess: {attrs.get('preprocess')}")
    lines.append(f"  versions: {attrs.get('versions')}")
    pool = json.loads(attrs.get("pool") or "{}")
    lines.append(f"  train pool: seeds {' '.join(map(str, pool['seeds']))} at <= {pool['shots']} shots"
                 if pool else "  train pool: the whole split")
    classnames, templates = info["classnames"], info["templates"]
    more = ", ..." if len(classnames) > 5 else ""
    lines.append(f"  classes: {len(classnames)} ({', '.join(classnames[:5])}{more})")
    lines.append(f"  templates: {len(templates)} (first: {templates[0]!r})" if templates else "  templates: 0")
    for name, n in info["splits"].items():
        aug = f", aug_features {n['aug_features']}" if "aug_features" in n else ""
        lines.append(f"  {name}: {n['encoded']} encoded of {n['listed']} listed rows, {n['skipped']} skipped, "
                     f"{n['pending']} pending, {n['not encoded']} not encoded; features {n['features']} "
                     f"{n['dtype']}{aug}")
    lines.append(f"  bad images: {info['bad']}")
    lines.append(f"  checksums: {checksummed} datasets verified" if checksummed else
                 "  checksums: none stored (made before they were added)")
    if attrs.get("complete"):
        read_cache(path, with_aug=False)  # raises CacheError if the file does not validate
        lines.append("  valid: yes")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
