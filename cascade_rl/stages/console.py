"""What the driver shows and how it stops: quiet console, start-up phases, step lines, Ctrl-C / SIGTERM.

- Quiet by default: Python logging and warnings of third-party libraries go to ``<run_dir>/logs/driver.log``;
  ``cascade-rl run -v`` shows them (and streams Ray workers' output) on the console too.
- Start-up prints one line per phase with its time, so the first minute is never silent.
- When stdout is not a terminal (piped, a Ray job's log), progress bars are off and every step prints one line
  with its key metrics instead.
- The first SIGINT/SIGTERM asks the run to stop at the next step boundary (``StopRun`` is raised there and the
  driver writes a complete checkpoint); a second one stops at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FILE = "logs/driver.log"


class StopRun(Exception):  # noqa: N818 - a request, not an error
    """Raised at a step boundary after Ctrl-C or SIGTERM; the driver checkpoints there and exits."""


class GracefulStop:
    """SIGINT/SIGTERM handlers: the first sets ``requested`` (stop at the next step boundary), the second raises
    ``KeyboardInterrupt`` (stop now). Installed after ``ray.init``, which sets a SIGTERM handler of its own."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once asked
        self._previous: dict[int, Any] = {}

    def install(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\n{name} again: stopping now, without a new checkpoint", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.requested = name
        print(f"\n{name}: stopping at the next step boundary and writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise StopRun(self.requested)

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.requested == "SIGTERM" else signal.SIGINT)


def setup_logging(run_dir: Path, verbose: bool) -> Path:
    """Third-party logging (and ``warnings``) into ``<run_dir>/logs/driver.log``; on the console only with -v."""
    path = run_dir / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cascade_rl", False):
            root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h._cascade_rl = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO)
    if not verbose:  # MLflow gives its logger a console handler when imported unless told not to
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    global _VERBOSE
    _VERBOSE = verbose
    quiet_libraries()
    logging.captureWarnings(True)
    if not verbose:
        warnings.simplefilter("default")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return path


LIBRARIES = ("mlflow", "ray", "vllm", "transformers", "datasets", "deepspeed", "torch", "alembic", "urllib3",
             "py.warnings")
_VERBOSE = False


def quiet_libraries() -> None:
    """Route the libraries' loggers to the root logger (the run's log file) instead of their own console
    handlers, which each adds when first imported; called again after each start-up phase imports more."""
    for name in LIBRARIES:
        lg = logging.getLogger(name)
        if not _VERBOSE:
            for h in [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                      and not isinstance(h, logging.FileHandler)]:
                lg.removeHandler(h)
        lg.propagate = True


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """``start-up: <name> 3.2 s`` — one line as each start-up phase ends."""
    t0 = time.perf_counter()
    quiet_libraries()
    try:
        yield
    finally:
        quiet_libraries()
        print(f"start-up: {name} {time.perf_counter() - t0:.1f} s", flush=True)


# metrics that close one step of a stage, and what its line shows
STEP_END_KEYS = ("perf/step_s", "perf/train_s", "rollout/tokens_per_s")
LINE_KEYS = (("train/loss", "loss"), ("reward/mean", "reward"), ("reward/accuracy", "acc"),
             ("eval/accuracy", "eval_acc"), ("rollout/response_tokens_mean", "resp_tokens"),
             ("perf/step_s", "step_s"), ("perf/train_s", "train_s"))


class StepLines:
    """One line per step (and per evaluation) with its key metrics, for a console that is not a terminal."""

    def __init__(self, tracker: Any, stream: Any = None) -> None:
        self.tracker, self.stream = tracker, stream or sys.stdout

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if not any(k in metrics for k in (*STEP_END_KEYS, "eval/accuracy")):
            return
        shown = " ".join(f"{label}={metrics[k]:.4g}" for k, label in LINE_KEYS if k in metrics)
        stage = self.tracker.stage or "start"
        print(f"[{stage}] step {step} {shown}", file=self.stream, flush=True)


def use_step_lines(tracker: Any) -> bool:
    """Progress bars on a terminal; one line per step elsewhere (a pipe, a file, a Ray job's log)."""
    if sys.stdout.isatty():
        return False
    tracker.observers.append(StepLines(tracker))  # the CLI turned tqdm's bars off (TQDM_DISABLE) already
    return True
