"""Shared pieces of the bench scripts: what machine a figure came from, and plain-text tables.

Imports neither torch nor jax, so every bench script can use it.
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ram_gib() -> float:
    """Physical memory in GiB (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def gpus() -> list[str]:
    """'name, memory' of each NVIDIA GPU that nvidia-smi lists; [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def package_versions(names: list[str]) -> dict[str, str]:
    """Installed version of each package ('-' if absent), plus python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def machine_lines(packages: list[str]) -> list[str]:
    """Date, OS, CPU, cores, RAM, GPUs and package versions, one `key: value` per line."""
    return [f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"os: {platform.platform()}",
            f"cpu: {cpu_model()}, {usable_cores()} usable cores",
            f"ram: {ram_gib():.0f} GiB",
            f"gpu: {'; '.join(gpus()) or 'none'}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())]


def load_average() -> float:
    """The 1-minute load average (runnable threads, this process's included), -1 if unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0


@dataclass(frozen=True)
class Timing:
    """One call: wall seconds, CPU seconds of this process plus its children that ended, and the share of the
    machine's CPU time that other processes (and the hypervisor, as steal time) took meanwhile (NaN if unknown)."""

    wall: float
    cpu: float
    others: float


def cpu_seconds() -> float:
    """User + system seconds of this process and of its finished (waited-for) children so far."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot, steal time included (Linux); NaN elsewhere."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object]) -> Timing:
    """Time `fn()`. `others` > 0 says that other processes competed for the CPU, so the wall time is noisy."""
    busy, cpu, start = machine_busy_seconds(), cpu_seconds(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    others = (machine_busy_seconds() - busy - cpu) / (wall * (os.cpu_count() or 1))
    return Timing(wall, cpu, min(max(others, 0.0), 1.0))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (pastes into RESULTS.md); floats get 3 significant digits unless already strings."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    text = [all(isinstance(row[i], str) for row in rows) for i in range(len(headers))]  # left-aligned columns

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if t else v.rjust(w) for v, w, t in zip(values, widths, text)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def run_in_folder(run: Callable[[Path], None], folder: Path | None, prefix: str,
                  errors: tuple[type[Exception], ...]) -> int:
    """Call run(folder) in `folder` (created) or a temporary folder; project errors print `error: ...` and give 2."""
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            run(folder)
        else:
            with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
                run(Path(tmp))
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
