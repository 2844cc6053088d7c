"""CLI: `python -m data {list,info,check,resolve,download,fashion-mnist}`; errors print `error: ...`, exit 2."""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from data.args import seed
from data.errors import DataError
from data.registry import dataset_names, get_dataset, load_benchmark, resolve_names


def _list(args: argparse.Namespace) -> None:
    for name in dataset_names(args.group):
        info = get_dataset(name)
        print(f"{name:15s} {info.group:9s} {len(info.classnames):5d} classes  DATA/{info.folder}/  {info.template}")


def _info(args: argparse.Namespace) -> None:
    from data.download import describe

    print(describe(get_dataset(args.name)))


def _check(args: argparse.Namespace) -> None:
    image_root, classnames, splits = load_benchmark(args.name, args.root, every_file=True)
    print(f"{get_dataset(args.name).name}: ok, {len(classnames)} classes, images under {image_root}")
    for split, samples in splits.items():
        per_class = Counter(label for _, label in samples)
        print(f"  {split:5s} {len(samples):8d} images, {len(per_class)} classes, "
              f"{min(per_class.values(), default=0)}-{max(per_class.values(), default=0)} per class")


def _resolve(args: argparse.Namespace) -> None:
    for info in resolve_names(args.names):
        print(info.name if info.parent is None else f"{info.name} {info.parent}")


def _download(args: argparse.Namespace) -> None:
    from data.download import download

    folder = download(get_dataset(args.name), args.root)
    print(f"{get_dataset(args.name).name}: ready in {folder}; check it with `python -m data check {args.name} "
          f"--root {args.root}`")


def _fashion_mnist(args: argparse.Namespace) -> None:
    from data.fashion_mnist import build

    out = build(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                test_per_class=args.test_per_class, seed=args.seed, cache_dir=args.cache, idx_dir=args.idx_dir)
    print(f"Fashion-MNIST image tree ready in {out}")


def parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m data`."""
    p = argparse.ArgumentParser(prog="python -m data", description="Dataset registry: list, describe, check and "
                                "download the benchmarks; build the offline Fashion-MNIST demo set.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list the registered datasets")
    s.add_argument("--group", choices=["benchmark", "shift", "demo"], help="only this group (default: all)")
    s.set_defaults(func=_list)

    s = sub.add_parser("info", help="classes, prompt, expected folder layout and manual download steps of a dataset")
    s.add_argument("name", help="dataset name (case-insensitive), see `python -m data list`")
    s.set_defaults(func=_info)

    s = sub.add_parser("check", help="check a dataset's layout under a data root and count its images")
    s.add_argument("name", help="dataset name (case-insensitive)")
    s.add_argument("--root", required=True, help="data root holding the dataset folders (CoOp's $DATA)")
    s.set_defaults(func=_check)

    s = sub.add_parser("resolve", help="the registered names of datasets as a user typed them, one a line; a "
                       "test-only set is followed by the set whose model it evaluates", description="Print the "
                       "registered name of every dataset named (case, '-' and '_' ignored; all = the benchmarks and "
                       "the shift sets, benchmarks, shifts), once each, one a line: 'NAME' for a dataset to train "
                       "on, 'NAME PARENT' for a test-only set evaluated with PARENT's model. Refuses an unknown name "
                       "or a test-only set without its PARENT.")
    s.add_argument("names", nargs="+", metavar="NAME", help="dataset names; a value may hold several, separated by "
                   "spaces or commas")
    s.set_defaults(func=_resolve)

    s = sub.add_parser("download", help="download a dataset with torchvision where possible, else print the steps")
    s.add_argument("name", help="dataset name (case-insensitive)")
    s.add_argument("--root", required=True, help="data root to download into (CoOp's $DATA)")
    s.set_defaults(func=_download)

    s = sub.add_parser("fashion-mnist", help="write the offline demo set DIR/{train,val,test}/<class>/*.png")
    s.add_argument("--out", required=True, help="output folder (created; kept if already built with these settings)")
    s.add_argument("--train-per-class", type=int, default=16, help="train images per class (default 16)")
    s.add_argument("--val-per-class", type=int, default=4, help="validation images per class, disjoint from train "
                   "(default 4)")
    s.add_argument("--test-per-class", type=int, default=50, help="test images per class (default 50)")
    s.add_argument("--seed", type=seed, default=0, help="seed of the per-class subsampling (default 0)")
    s.add_argument("--cache", help="where the Debian package is unpacked (default ~/.cache/cmm/fashion-mnist)")
    s.add_argument("--idx-dir", help="use these 4 Fashion-MNIST IDX files instead of fetching the Debian package")
    s.set_defaults(func=_fashion_mnist)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
