"""JAX's persistent compilation cache (on by default, in a per-user folder) and counters of what a run compiles.

The folder: ``--compile-cache DIR``, else ``$CMM_JAX_CACHE``, else ``$XDG_CACHE_HOME/cmm/jax`` (default
``~/.cache/cmm/jax``); ``--no-compile-cache`` or ``CMM_JAX_CACHE=off`` turns it off. Every program is cached,
however small or quick to compile, so a rerun (or another dataset of the same shapes) compiles nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

ENV = "CMM_JAX_CACHE"
OFF = "off"
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # XLA compile, or load from the persistent cache
_TRACE_LOWER = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def cache_dir(option: str | None = None, disabled: bool = False) -> Path | None:
    """The persistent cache folder chosen by the option, ``$CMM_JAX_CACHE`` or the per-user default; None if off."""
    choice = OFF if disabled else option or os.environ.get(ENV)
    if choice == OFF:
        return None
    if choice:
        return Path(choice).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmm" / "jax"


def enable(path: Path | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (None: leave it off), with no minimum compile time or
    entry size. Call before the process compiles anything: JAX decides once whether a process uses the cache.
    A folder that cannot be written leaves it off with one notice on stderr (JAX would warn once per program)."""
    import jax

    if path is None:
        return
    problem = _unwritable(path)
    if problem:
        print(f"notice: the compilation cache {path} cannot be written ({problem}); compiling without it "
              f"(--compile-cache DIR moves it, --no-compile-cache or {ENV}={OFF} turns it off)", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _unwritable(path: Path) -> str:
    """'' if a file can be created in folder ``path`` (made if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return ""


@dataclass(frozen=True)
class CompileStats:
    """What a process compiled so far. programs: executables built (XLA compiles + persistent-cache loads);
    cache_hits: of those, loaded from the persistent cache; compile_s: seconds in XLA compiles and loads;
    trace_s: seconds tracing and lowering to MLIR."""

    programs: int = 0
    cache_hits: int = 0
    compile_s: float = 0.0
    trace_s: float = 0.0

    def __sub__(self, other: "CompileStats") -> "CompileStats":
        return CompileStats(self.programs - other.programs, self.cache_hits - other.cache_hits,
                            self.compile_s - other.compile_s, self.trace_s - other.trace_s)

    @property
    def compiled(self) -> int:
        """Programs XLA compiled (not loaded from the persistent cache)."""
        return self.programs - self.cache_hits

    def to_dict(self) -> dict[str, float | int]:
        """compile.json's JSON: programs, compiled, cache_hits, compile_s and trace_s (seconds, 3 decimals)."""
        return {"programs": self.programs, "compiled": self.compiled, "cache_hits": self.cache_hits,
                "compile_s": round(self.compile_s, 3), "trace_s": round(self.trace_s, 3)}

    def line(self) -> str:
        """The counts in one printed line."""
        return (f"compiled {self.compiled} programs ({self.cache_hits} more from the compilation cache) in "
                f"{self.compile_s:.1f} s, traced in {self.trace_s:.1f} s")


_lock = threading.Lock()
_totals = {"programs": 0, "cache_hits": 0, "compile_s": 0.0, "trace_s": 0.0}
_listening = False


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT:
        with _lock:
            _totals["cache_hits"] += 1


def _on_duration(event: str, duration_secs: float, **_) -> None:
    with _lock:
        if event == _BACKEND_COMPILE:
            _totals["programs"] += 1
            _totals["compile_s"] += duration_secs
        elif event in _TRACE_LOWER:
            _totals["trace_s"] += duration_secs


def stats() -> CompileStats:
    """The process's totals so far (counting starts at the first call); subtract two for a span's figures."""
    import jax

    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _listening = True
        return CompileStats(**_totals)
