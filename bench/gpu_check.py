"""The GPU check of issue 12: the GPU path proven and measured in one call of under 8 minutes.

Runs the parts of `bench.gpu_parts`, each in its own process with its own time limit (the smaller of its share
and what is left of --budget-s), so that a part that fails, hangs or runs out of time is recorded and the others
still run:
  env          the machine, PyTorch's GPU, the devices JAX sees;
  features     CUDA fp16 features (tiny model, ViT-B-32, random weights) vs CPU fp32 ones: cosine >= 0.999 per row;
  train_check  a short `python -m train_jax` on the GPU vs the CPU: same selected settings, accuracies within one
               test image (on the GPU with JAX's default matmul precision, and with 'highest');
  sweep        an ImageNet-sized 16-shot cache through `python -m train_jax` (3 seeds, default grid and methods);
  extract      `bench.bench_extract` on CUDA: ViT-B-32 and RN50, batch 256, workers = cores, without and with
               10 augmented views;
  train        `bench.bench_train` large / small / tiny: vmapped runner vs the JAX and PyTorch (CUDA) loops.
Parts that need JAX on the GPU are skipped with 'JAX on CPU only' when JAX sees no GPU. Writes to --out:
summary.md (the table to paste into bench/RESULTS.md), results.json (every figure) and gpu_check.log (every part's
output); both are rewritten after each part, so a stopped run keeps what it measured. Scratch data (JPEGs, caches)
goes to a temporary folder. Exit status 0 when every part ran, 1 when one failed or was cut, 2 on bad options.

    bash bench/gpu_check.sh                                  # on the GPU machine (see bench/README.md)
    python -m bench.gpu_check --smoke --device cpu           # the CPU smoke mode (tests), seconds
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from bench.common import format_table
from bench.gpu_parts import COSINE_MIN, FULL, SMOKE, Sizes

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"env": 60, "features": 90, "train_check": 150, "sweep": 90, "extract": 150, "train": 200}  # s, at most
NEEDS_JAX_GPU = ("train_check", "sweep", "train")
MIN_PART_S = 15  # a part is skipped when less than this is left of the budget
TARGETS = {"extract": 0.8, "large": 0.6, "tiny": 2.0, "sweep": 60.0}  # issue 12
LOG_TAIL = 12  # lines of a failed part's output shown on the console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT if set, else "
                                                 "bench_out/gpu_check-<UTC time>)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default; JAX uses its default device) or cpu (JAX too, JAX_PLATFORMS=cpu)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole check in seconds (tests)")
    parser.add_argument("--budget-s", type=float, default=450, help="total seconds for all parts (default 450)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="parts to run, in this order (default: all)")
    parser.add_argument("--work", type=Path, help="scratch folder, kept (default: a temporary folder, deleted)")
    return parser


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return ROOT / "bench_out" / f"gpu_check-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_part(name: str, spec: dict, limit: float, log: Path, result: Path) -> tuple[str, float]:
    """Run one part in its own process group, its output appended to `log`: (status, seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    if spec["device"] == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
        f.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_parts", name, json.dumps(spec), str(result)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also when this process is stopped: nothing of the part may outlive it
            kill_group(proc.pid)
            proc.wait()
    seconds = time.perf_counter() - start
    if code is None:
        return f"timed out after {limit:.0f} s", seconds
    if code == 0:
        return "ok", seconds
    lines = log.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return f"failed (exit {code}): {lines[-1] if lines else ''}", seconds


def kill_group(pid: int) -> None:
    """Kill the process group of the part `pid` leads: the part and what it started (loader workers, bench
    workers), if any is left."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def log_tail(log: Path, lines: int) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()[-lines:])


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def summary_rows(parts: dict, device: str) -> list[list[object]]:
    """Rows (part, check, figure, target, met/missed) of every figure measured so far."""
    rows: list[list[object]] = []
    res = {name: p.get("result") or {} for name, p in parts.items()}
    for model, r in res.get("features", {}).items():
        cos = r["min_cosine"]
        rows.append(["features", f"{model}: {device} features vs CPU fp32, smallest cosine (image / views / text)",
                     " / ".join(f"{cos[k]:.5f}" for k in ("image", "views", "text")), f">= {COSINE_MIN}",
                     met(r["ok"])])
    check = res.get("train_check", {})
    for label, r in check.get("runs", {}).items():
        if label == "cpu":
            continue
        precision = "'highest'" if label == "device_highest" else "default"
        rows.append(["train_check", f"train_jax {device} ({precision} matmul precision) vs CPU: same selected "
                     "setting, largest test-accuracy difference", f"{r['same_setting']}/{r['selected']}, "
                     f"{r['max_test_diff']:.2f} pt", f"all, <= {100 / check['test_images']:.2f} pt (one image)",
                     met(r["ok"])])
    for key, r in res.get("extract", {}).items():
        if "error" in r:
            rows.append(["extract", key, r["error"], f">= {TARGETS['extract']}", "failed"])
            continue
        rows.append(["extract", f"{key}: batch {r['batch']}, {r['workers']} workers, {r['images']} images; "
                     f"extract / bare img/s", f"{r['extract_img_s']:.0f} / {r['bare_img_s']:.0f} = "
                     f"{r['extract_bare']:.2f}", f">= {TARGETS['extract']}",
                     met(r["extract_bare"] >= TARGETS["extract"])])
    train = res.get("train", {})
    for name, c in train.get("cases", {}).items():
        one, top = c["runs"]
        sec = c["seconds"]
        tflops = top * c["gflop_per_run"] / sec["vmapped"] / 1e3
        pct, pct_torch = 1e3 * tflops / train["peak_gflops"], 1e3 * tflops / train["torch_peak_gflops"]
        rows.append(["train", f"{name} S={top}: vmapped runs/s, TFLOP/s, % of JAX's float32 matmul peak "
                     f"({train['peak_gflops'] / 1e3:.1f} TFLOP/s, its default precision) and of PyTorch's (true "
                     f"float32: {train['torch_peak_gflops'] / 1e3:.1f} TFLOP/s)", f"{top / sec['vmapped']:.3g} "
                     f"runs/s, {tflops:.3g} TFLOP/s, {100 * pct:.0f}% / {100 * pct_torch:.0f}%",
                     f">= {100 * TARGETS['large']:.0f}% (JAX's)" if name == "large" else "-",
                     met(pct >= TARGETS["large"]) if name == "large" else "-"])
        rows.append(["train", f"{name} S={top}: vmapped vs JAX loop / vs PyTorch loop ({device})",
                     f"{sec['jax_loop'] / sec['vmapped']:.2f}x / {sec['torch_loop'] / sec['vmapped']:.2f}x", "-", "-"])
        if name == "tiny":
            ratio = sec["vmapped"] / sec["vmapped_one"]
            rows.append(["train", f"tiny: time of S={top} / time of S={one}", f"{ratio:.2f}x",
                         f"<= {TARGETS['tiny']:.0f}x", met(ratio <= TARGETS["tiny"])])
    sweep = res.get("sweep", {})
    if "seconds" in sweep:
        rows.append(["sweep", f"{sweep['shots']}-shot, {sweep['classes']} classes, dim {sweep['dim']}: "
                     f"{sweep['seeds']} seeds x grid x {sweep['methods']} methods = {sweep['runs']} runs, wall s",
                     f"{sweep['seconds']:.1f}", f"< {TARGETS['sweep']:.0f}", met(sweep["seconds"] < TARGETS["sweep"])])
    return rows


def summary_markdown(state: dict) -> str:
    """The Markdown to paste into bench/RESULTS.md: the card, the parts' status, the figures and targets, details."""
    env = (state["parts"].get("env") or {}).get("result") or {}
    card = env.get("gpu") or "no GPU"
    jax = (f"JAX {env.get('jax', '?')} on {', '.join(env['jax_devices'])}" if "jax_devices" in env
           else "JAX devices unknown")
    if env.get("jax_devices") and not env.get("jax_gpu"):
        jax += " (JAX on CPU only)"
    lines = [f"## GPU check: {card}, {state['started']}", "",
             f"`python -m bench.gpu_check{' --smoke' if state['smoke'] else ''} --device {state['device']}`, commit "
             f"{state['commit']}; {state['elapsed_s']:.0f} s of a {state['budget_s']:.0f} s budget. PyTorch "
             f"{env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), {jax}.", ""]
    lines += [f"    {line}" for line in env.get("machine", [])]
    lines += ["", format_table(["part", "status", "seconds"],
                               [[n, p["status"], round(p["seconds"], 1)] for n, p in state["parts"].items()]), ""]
    rows = summary_rows(state["parts"], state["device"])
    if rows:
        lines += [format_table(["part", "check", "figure", "target", "met?"], rows), ""]
    extract = (state["parts"].get("extract") or {}).get("result") or {}
    for key, r in extract.items():
        if "table" in r:
            lines += [f"**extract, {key}**", "", r["table"], ""]
    for name, c in ((state["parts"].get("train") or {}).get("result") or {}).get("cases", {}).items():
        lines += [f"**train, {name}**: {c['describe']}; the step's matmuls alone {c['step_gflops']:.0f} GFLOP/s", "",
                  c["table"], ""]
    return "\n".join(lines)


def write_outputs(out: Path, state: dict) -> str:
    """results.json and summary.md in `out`; returns the Markdown."""
    text = summary_markdown(state)
    (out / "results.json").write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    return text


def skip_reason(name: str, state: dict) -> str:
    """Why `name` cannot run ('' if it can): JAX on CPU only for the JAX parts on a GPU check."""
    env = (state["parts"].get("env") or {}).get("result") or {}
    if name in NEEDS_JAX_GPU and state["device"] != "cpu" and "jax_gpu" in env and not env["jax_gpu"]:
        return f"skipped: JAX on CPU only (JAX {env.get('jax')} sees {', '.join(env['jax_devices'])})"
    return ""


def check(args: argparse.Namespace, out: Path, work: Path) -> int:
    """Run the parts in order within the budget; write and print the summary; the exit status."""
    sizes: Sizes = SMOKE if args.smoke else FULL
    log = out / "gpu_check.log"
    log.write_text("", encoding="utf-8")
    spec = {"device": args.device, "work": str(work), "sizes": asdict(sizes)}
    state = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
             "device": args.device, "smoke": args.smoke, "budget_s": args.budget_s, "elapsed_s": 0.0,
             "sizes": asdict(sizes), "parts": {}}
    start = time.perf_counter()
    for name in args.parts:
        left = args.budget_s - (time.perf_counter() - start)
        reason = skip_reason(name, state) or ("" if left >= MIN_PART_S else
                                              f"skipped: {left:.0f} s left of the budget")
        result = work / f"{name}.json"
        if reason:
            status, seconds = reason, 0.0
        else:
            print(f"[{name}] running (limit {min(PARTS[name], left):.0f} s) ...", flush=True)
            status, seconds = run_part(name, spec, min(PARTS[name], left), log, result)
        part = {"status": status, "seconds": seconds,
                "result": json.loads(result.read_text()) if result.exists() else None}
        state["parts"][name] = part
        state["elapsed_s"] = time.perf_counter() - start
        write_outputs(out, state)
        print(f"[{name}] {status} ({seconds:.0f} s)", flush=True)
        if status.startswith(("failed", "timed out")):
            print(log_tail(log, LOG_TAIL), flush=True)
        env = part["result"] or {}
        if name == "env" and args.device == "cuda" and env.get("cuda") is False:
            print("error: --device cuda: PyTorch sees no CUDA GPU here; for the CPU smoke mode use --smoke "
                  "--device cpu", file=sys.stderr)
            return 2
    print("\n" + write_outputs(out, state))
    print(f"\nwritten: {out / 'summary.md'}, {out / 'results.json'}, {log}")
    return 0 if all(p["status"] == "ok" or p["status"].startswith("skipped: JAX")
                    for p in state["parts"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget_s <= 0:
        print(f"error: --budget-s {args.budget_s}: must be > 0", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # clean up as on Ctrl-C
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return check(args, out, args.work)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        return check(args, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
