"""The parts of the GPU check (`bench.gpu_check`), one per process, so that a crash, a hang or a GPU left in a bad
state costs one part only. Started by `bench.gpu_check`; each part rewrites its result file (JSON) as its figures
come in, so that a part stopped at its time limit still leaves what it measured.

    python -m bench.gpu_parts PART SPEC_JSON RESULT_JSON

PART is one of `PARTS`; SPEC_JSON holds ``device`` (cuda or cpu), ``work`` (a scratch folder) and ``sizes`` (the
fields of `Sizes`). Frameworks are imported inside the parts: each part loads only the one it measures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import machine_lines, usable_cores
from bench.train_problems import CASES, normalize, useful_flops
from data.cache import read_cache
from data.cache_writer import write_cache
from data.registry import ensemble_templates

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["torch", "torchvision", "open_clip_torch", "jax", "jaxlib", "flax", "optax", "numpy", "h5py", "pillow"]
COSINE_MIN = 0.999  # per-row cosine of CUDA fp16 features against CPU fp32 ones (issue 12)
CHECK_TEST = 20  # test images per class of the train_jax check: accuracies may differ by one of them
Save = Callable[[dict], None]


@dataclass(frozen=True)
class Sizes:
    """Every size of the check. `FULL` is the GPU check of issue 12; `SMOKE` runs in seconds on a CPU."""

    feature_models: tuple[str, ...] = ("cmm-tiny-vit", "ViT-B-32")  # CUDA fp16 vs CPU fp32, random weights
    feature_images: int = 32
    feature_size: tuple[int, int] = (500, 375)
    feature_views: int = 2  # augmented views per image, compared too
    check_classes: int = 10  # the short train_jax run, device vs CPU
    check_dim: int = 64
    check_shots: int = 4
    check_seeds: tuple[int, ...] = (1, 2, 3)
    check_grid: tuple[str, ...] = ()  # --grid arguments; () = the default grid
    check_methods: tuple[str, ...] = ()  # --methods arguments; () = the default methods
    extract_models: tuple[str, ...] = ("ViT-B-32", "RN50")  # bench_extract, each without and with aug views
    extract_images: int = 8192
    extract_aug_images: int = 1024
    aug_views: int = 10
    batch_size: int = 256
    extract_rounds: int = 2
    image_size: tuple[int, int] = (500, 375)
    workers: int = -1  # DataLoader workers; -1 = the usable cores
    train_cases: tuple[str, ...] = ("large", "tiny", "small")  # bench_train (the cases with a target first), at
    # the case's smallest and largest S
    train_runs: tuple[int, ...] = ()  # () = each case's own smallest and largest S
    train_epochs: int = 0  # 0 = each case's own
    train_dim: int = 0  # 0 = each case's own
    train_repeats: int = 1
    peak_size: int = 8192  # side of the float32 matmul of the peak: ~3 ms on an H100, well past launch overhead
    sweep_classes: int = 1000  # ImageNet-sized 16-shot sweep through `python -m train_jax`
    sweep_dim: int = 1024
    sweep_shots: int = 16
    sweep_train: int = 20  # train images per class: 16 shots + 4 validation (no val split, as ImageNet)
    sweep_test: int = 10
    sweep_seeds: tuple[int, ...] = (1, 2, 3)
    sweep_grid: tuple[str, ...] = ()
    sweep_methods: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> "Sizes":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


FULL = Sizes()
SMOKE = Sizes(feature_models=("cmm-tiny-vit",), feature_images=6, feature_size=(40, 30), feature_views=1,
              check_classes=4, check_dim=16, check_shots=2, check_seeds=(1, 2),
              check_grid=("lr=0.01,0.001", "epochs=3"), check_methods=("cmm",),
              extract_models=("cmm-tiny-vit",), extract_images=6, extract_aug_images=4, aug_views=1, batch_size=4,
              extract_rounds=1, image_size=(40, 30), workers=0, train_cases=("tiny",), train_runs=(1, 2),
              train_epochs=2, train_dim=8, peak_size=64, sweep_classes=5, sweep_dim=16, sweep_shots=2, sweep_train=6,
              sweep_test=4, sweep_seeds=(1, 2), sweep_grid=("lr=0.01,0.001", "epochs=3"),
              sweep_methods=("cmm",))


def workers(sizes: Sizes) -> int:
    """DataLoader workers of the extraction parts."""
    return usable_cores() if sizes.workers < 0 else sizes.workers


def write_class_cache(path: Path, *, classes: int, dim: int, train: int, val: int, test: int, dataset: str,
                      noise: float = 0.4, seed: int = 0) -> Path:
    """A cache of unit features with class structure, `train`, `val` (0: no val split, as ImageNet) and `test`
    images per class, and the text features of 8 templates per class (the dataset's own, as extraction writes it,
    and CLIP's ImageNet ensemble): image features normalise(t_c + noise * N(0, I)), t_c the class's first text
    feature (zero-shot accuracy ~80% with 10 classes, ~24% with 1000, at noise 0.4)."""
    rng = np.random.default_rng(seed)
    templates = ["a photo of a {}.", *ensemble_templates()]
    text = normalize(rng.standard_normal((classes, len(templates), dim), dtype=np.float32))

    def split(name: str, per_class: int) -> dict:
        labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
        jitter = rng.standard_normal((len(labels), dim), dtype=np.float32)
        return {"features": normalize(text[labels, 0] + noise * jitter), "labels": labels,
                "paths": [f"{name}/c{y:04d}/{i:06d}.jpg" for i, y in enumerate(labels)]}

    splits = {"train": split("train", train), "test": split("test", test)}
    if val:
        splits["val"] = split("val", val)
    return write_cache(path, attrs={"dataset": dataset, "model": "synthetic", "embed_dim": dim},
                       classnames=[f"class {c}" for c in range(classes)],
                       templates=templates, text_features=text, splits=splits,
                       overwrite=True)  # a scratch cache: a rerun with other sizes replaces it


def env(spec: dict, save: Save) -> None:
    """The machine, PyTorch's GPU (name, memory) and the devices JAX sees."""
    out: dict = {"machine": machine_lines(PACKAGES)}
    import torch

    out |= {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if out["cuda"]:
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}"}
    save(out)
    import jax

    out["jax"] = jax.__version__
    try:
        devices = jax.devices()
    except RuntimeError as e:  # a CUDA plugin that cannot start: the JAX parts are skipped, the others run
        out |= {"jax_devices": [f"none ({str(e).splitlines()[0][:200]})"], "jax_gpu": False}
    else:
        out |= {"jax_devices": [f"{d.platform}: {d.device_kind}" for d in devices],
                "jax_gpu": any(d.platform in ("gpu", "cuda") for d in devices)}
    save(out)


def features(spec: dict, save: Save) -> None:
    """Features of the same JPEGs through the whole extraction pipeline on the device (fp16 autocast on CUDA) and
    on the CPU (float32), the same weights on both: the smallest per-row cosine of the image features, their
    augmented views and the text features."""
    import copy

    import torch

    from bench.bench_extract import extract_folder, make_jpegs
    from extract.models import load_model

    sizes, work = Sizes.from_dict(spec["sizes"]), Path(spec["work"])
    root = make_jpegs(work / "feature_jpegs", sizes.feature_images, sizes.feature_size, 3, processes=usable_cores())
    out: dict = {}
    for name in sizes.feature_models:
        cpu = load_model(name, "random")
        on_device = dataclasses.replace(cpu, model=copy.deepcopy(cpu.model).to(spec["device"]))
        caches = {}
        for label, loaded in (("cpu", cpu), ("device", on_device)):
            path = work / f"features-{name}-{label}.h5"
            path.unlink(missing_ok=True)
            device = torch.device("cpu" if label == "cpu" else spec["device"])
            extract_folder(root, loaded, path, 8, min(4, workers(sizes)), sizes.feature_views, device)
            caches[label] = read_cache(path)
        a, b = caches["cpu"], caches["device"]
        pairs = {"image": (a.splits["train"].features, b.splits["train"].features),
                 "views": (a.splits["train"].aug_features, b.splits["train"].aug_features),
                 "text": (a.text_features, b.text_features)}
        cos = {k: float(np.min(np.sum(x.astype(np.float64) * y, axis=-1))) for k, (x, y) in pairs.items()}
        out[name] = {"min_cosine": cos, "rows": len(a.splits["train"].labels), "ok": min(cos.values()) >= COSINE_MIN}
        print(f"{name}: smallest cosine, {spec['device']} vs cpu: {cos}")
        save(out)


def train_check(spec: dict, save: Save) -> None:
    """`python -m train_jax` on a small synthetic cache on the CPU and on JAX's default device (with its default
    matmul precision, and with 'highest'): per (method, seed) the selected setting and its test accuracy."""
    sizes, work = Sizes.from_dict(spec["sizes"]), Path(spec["work"])
    cache = write_class_cache(work / "check.h5", classes=sizes.check_classes, dim=sizes.check_dim,
                              train=2 * sizes.check_shots, val=4, test=CHECK_TEST, dataset="Synth")
    envs = {"cpu": {"JAX_PLATFORMS": "cpu"}, "device": {}}
    if spec["device"] != "cpu":
        envs["device_highest"] = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    runs, out = {}, {"test_images": CHECK_TEST * sizes.check_classes, "runs": {}}
    for label, extra in envs.items():
        seconds, records = train_jax(cache, work / f"check-{label}", sizes.check_shots, sizes.check_seeds,
                                     sizes.check_grid, sizes.check_methods, extra)
        runs[label] = {(r["method"], r["seed"]): r for r in records if r["selected"]}
        out["runs"][label] = {"seconds": seconds, "selected": len(runs[label])}
        if label != "cpu":
            both = runs["cpu"].keys() & runs[label].keys()
            same = sum(runs["cpu"][k]["setting"] == runs[label][k]["setting"] for k in both)
            diff = max(abs(runs["cpu"][k]["test_acc"] - runs[label][k]["test_acc"]) for k in both)
            out["runs"][label] |= {"same_setting": same, "max_test_diff": diff,
                                   "ok": same == len(runs["cpu"].keys() | runs[label].keys())
                                   and diff <= 100 / out["test_images"] + 1e-9}
        save(out)


def train_jax(cache: Path, out: Path, shots: int, seeds: tuple[int, ...], grid: tuple[str, ...],
              methods: tuple[str, ...], extra_env: dict) -> tuple[float, list[dict]]:
    """Run `python -m train_jax` on `cache` into `out` (its output goes to this part's log; empty grid or methods:
    the defaults): (wall seconds, results.json's run records). Raises RuntimeError if it fails."""
    argv = [sys.executable, "-m", "train_jax", "--cache", str(cache), "--out", str(out), "--shots", str(shots),
            "--seeds", *map(str, seeds), *(["--grid", *grid] if grid else []),
            *(["--methods", *methods] if methods else [])]
    print("$", " ".join(argv[1:]), " ".join(f"{k}={v}" for k, v in extra_env.items()), flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **extra_env})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"python -m train_jax failed (exit {done.returncode}); see the log above")
    return seconds, json.loads((out / "results.json").read_text())["runs"]


def sweep(spec: dict, save: Save) -> None:
    """The whole sweep of an ImageNet-sized 16-shot cache: seeds x the default grid x the default methods, one
    `python -m train_jax` call, wall time (imports, reading the cache and compiling included)."""
    sizes, work = Sizes.from_dict(spec["sizes"]), Path(spec["work"])
    start = time.perf_counter()
    cache = write_class_cache(work / "sweep.h5", classes=sizes.sweep_classes, dim=sizes.sweep_dim,
                              train=sizes.sweep_train, val=0, test=sizes.sweep_test, dataset="ImageNet")
    out = {"write_s": time.perf_counter() - start, "classes": sizes.sweep_classes, "dim": sizes.sweep_dim,
           "shots": sizes.sweep_shots, "seeds": len(sizes.sweep_seeds)}
    save(out)
    seconds, records = train_jax(cache, work / "sweep", sizes.sweep_shots, sizes.sweep_seeds, sizes.sweep_grid,
                                 sizes.sweep_methods, {})
    selected = [r["test_acc"] for r in records if r["selected"] and r["method"] == "cmm"]
    out |= {"seconds": seconds, "runs": len(records), "methods": len({r["method"] for r in records}),
            "cmm_test_acc": float(np.mean(selected))}
    save(out)


def extract(spec: dict, save: Save) -> None:
    """`bench.bench_extract` for each model, without and with augmented views (random weights)."""
    from bench import bench_extract

    sizes, work = Sizes.from_dict(spec["sizes"]), Path(spec["work"])
    out: dict = {}
    for model in sizes.extract_models:
        for views, images in ((0, sizes.extract_images), (sizes.aug_views, sizes.extract_aug_images)):
            key = f"{model}, {views} aug views"
            argv = ["--model", model, "--images", str(images), "--size", "x".join(map(str, sizes.image_size)),
                    "--batch-size", str(sizes.batch_size), "--workers", str(workers(sizes)), "--aug-views", str(views),
                    "--rounds", str(sizes.extract_rounds), "--device", spec["device"]]
            print(f"\n$ python -m bench.bench_extract {' '.join(argv)}", flush=True)
            try:
                result = bench_extract.run(bench_extract.build_parser().parse_args(argv), work / "extract")
                out[key] = {**result, "images": images, "views": views, "batch": sizes.batch_size,
                            "workers": workers(sizes)}
            except Exception as e:  # one model failing (out of memory, say) must not lose the others
                out[key] = {"error": f"{type(e).__name__}: {e}"}
                print(f"error: {key}: {out[key]['error']}", flush=True)
            save(out)


def train(spec: dict, save: Save) -> None:
    """`bench.bench_train` per case at its smallest and largest S: the vmapped runner, the JAX loop and the PyTorch
    loop (on the same device), JAX's float32 matmul peak (its default precision) and PyTorch's (true float32)."""
    from bench import bench_train

    sizes = Sizes.from_dict(spec["sizes"])
    threads, torch_device = usable_cores(), spec["device"]
    torch_peak = bench_train.worker("train_worker_torch", "peak", sizes.peak_size, threads, torch_device)
    out: dict = {"torch_peak_gflops": torch_peak["matmul_gflops"], "cases": {}}
    save(out)
    measured = {}
    for name in sizes.train_cases:
        base = CASES[name]
        case = dataclasses.replace(base, runs=sizes.train_runs or (min(base.runs), max(base.runs)),
                                   epochs=sizes.train_epochs or base.epochs, dim=sizes.train_dim or base.dim)
        print(f"\n{name}: {case.describe()}, S = {case.runs}", flush=True)
        measured[name] = case, bench_train.measure_case(case, sizes.train_repeats, threads, True, 1, sizes.peak_size,
                                                        torch_device)
        out["peak_gflops"] = max(res["peak"]["matmul_gflops"] for _, res in measured.values())
        for key, (case, res) in measured.items():  # every case against the best peak so far, as bench_train
            one, top = case.runs[0], case.runs[-1]
            sec = {"vmapped_one": res["vmapped"][one]["seconds"][str(one)],
                   "vmapped": res["vmapped"][top]["seconds"][str(top)],
                   **{k: res[k]["seconds"][str(top)] for k in ("jax_loop", "torch_loop")}}
            out["cases"][key] = {"describe": case.describe(), "runs": [one, top], "seconds": sec,
                                 "gflop_per_run": useful_flops(case) / 1e9, "step_gflops": res["peak"]["step_gflops"],
                                 "compile_s": res["vmapped"][top]["compile_s"],
                                 "table": bench_train.case_table(case, res, out["peak_gflops"])}
        print(out["cases"][name]["table"], flush=True)
        save(out)


PARTS: dict[str, Callable[[dict, Save], None]] = {"env": env, "features": features, "train_check": train_check,
                                                  "sweep": sweep, "extract": extract, "train": train}


def main(argv: list[str]) -> int:
    part, spec, result = argv[0], json.loads(argv[1]), Path(argv[2])

    def save(data: dict) -> None:
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, result)

    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    PARTS[part](spec, save)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
