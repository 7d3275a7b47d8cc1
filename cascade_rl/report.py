"""``cascade-rl report``: one PNG of a run's reward, held-out accuracy and losses, with stage boundaries.

Reads the MLflow run (default store ``sqlite:///<run_dir>/mlflow.db``, newest run when no id is given) and
draws three panels against the global step:

    reward      reward/mean, reward/accuracy            (rollout and gspo stages: the sampled training groups)
    held-out    eval/accuracy (+ eval/sampled/accuracy)  (greedy, and avg@k over sampled answers; at the start,
                                                        every eval.every_steps, stage ends)
    losses      train/loss, train/loss_*, train/*loss*  (sft LM loss, mpo DPO/BCO/LM terms, gspo policy loss)

Stage boundaries come from the driver's ``perf/stage_<name>_s`` metric, logged once at the global step where
each stage ended; a stage still running (a later ``stages.N.name`` param without its metric) is labelled too.
Matplotlib's Agg canvas is used directly, so no global backend is changed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .tracking import default_tracking_uri

logger = logging.getLogger(__name__)

STAGE_METRIC = re.compile(r"^perf/stage_(?P<name>.+)_s$")
REWARD_KEYS = ("reward/mean", "reward/accuracy")
EVAL_KEYS = ("eval/accuracy", "eval/sampled/accuracy")


@dataclass
class Report:
    """What ``make_report`` drew: the file, the run, each panel's series and the stage boundaries."""

    path: Path
    run_id: str
    run_name: str
    panels: dict[str, list[str]] = field(default_factory=dict)  # panel title -> metric keys drawn
    boundaries: list[tuple[int, str]] = field(default_factory=list)  # (global step where it ended, stage)
    running_stage: str | None = None  # a stage that started but has not logged its end yet

    def summary(self) -> str:
        lines = [f"report {self.path} for run {self.run_name} ({self.run_id})"]
        lines += [f"  {title}: {', '.join(keys) or '(none logged)'}" for title, keys in self.panels.items()]
        ends = ", ".join(f"{name}@{step}" for step, name in self.boundaries) or "(none)"
        lines.append(f"  stage ends: {ends}" + (f"; running: {self.running_stage}" if self.running_stage else ""))
        return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, *,
                 run_id: str | None = None, tracking_uri: str | None = None) -> Path:
    """Plot a run's curves to ``output`` (default ``<run_dir>/report.png``) and return the PNG path."""
    report = make_report(run_dir, output, run_id=run_id, tracking_uri=tracking_uri)
    logger.info(report.summary())
    return report.path


def make_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, *,
                run_id: str | None = None, tracking_uri: str | None = None) -> Report:
    """Like ``write_report`` but returns what was drawn (for tests and callers that want the summary)."""
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    uri = tracking_uri or _default_store(run_dir)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id) if run_id else _newest_run(client, uri)
    run_id = run.info.run_id
    keys = sorted(run.data.metrics)
    history = {k: _history(client, run_id, k) for k in keys if _wanted(k)}

    boundaries = sorted((steps[-1][0], STAGE_METRIC.match(k)["name"])
                        for k, steps in history.items() if STAGE_METRIC.match(k) and steps)
    running = _running_stage(run.data.params, boundaries, history)
    panels = {
        "Training reward (sampled groups)": [k for k in REWARD_KEYS if history.get(k)],
        "Held-out accuracy (greedy; sampled = avg@k)": [k for k in EVAL_KEYS if history.get(k)],
        "Losses": _loss_keys(history),
    }
    out = Path(output) if output else run_dir / "report.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{run.info.run_name or run_id} — run {run_id[:8]}"
    _draw(out, title, panels, history, boundaries, running)
    return Report(path=out, run_id=run_id, run_name=run.info.run_name or "", panels=panels,
                  boundaries=boundaries, running_stage=running)


# ---------------------------------------------------------------------------------------------- reading


def _default_store(run_dir: Path) -> str:
    db = run_dir / "mlflow.db"
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}: pass the run folder (the recipe's run_dir, e.g. "
                                f"runs/tiny_cascade) or --tracking-uri for a remote/other store")
    return default_tracking_uri(run_dir)


def _newest_run(client, uri: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=100) \
        if experiments else []
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # a recipe run, not a stage's child run
    if not runs:
        raise ValueError(f"no MLflow runs in {uri}; has the run started? (cascade-rl run RECIPE)")
    return runs[0]


def _wanted(key: str) -> bool:
    return key in REWARD_KEYS or key in EVAL_KEYS or bool(STAGE_METRIC.match(key)) or _is_loss(key)


def _is_loss(key: str) -> bool:
    return key.startswith("train/") and "loss" in key[len("train/"):]


def _loss_keys(history: dict[str, list[tuple[int, float]]]) -> list[str]:
    keys = [k for k in history if _is_loss(k) and history[k]]
    return sorted(keys, key=lambda k: (k != "train/loss", k))  # the total loss first


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` sorted by step; a step logged twice (a resumed run) keeps its latest value."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def _running_stage(params: dict[str, str], boundaries: list[tuple[int, str]], history: dict) -> str | None:
    """The first recipe stage (``stages.N.name`` params) without an end metric, when something was logged
    after the last stage end (the start evaluation counts for the first stage)."""
    ended = {name for _, name in boundaries}
    names = [params[f"stages.{i}.name"] for i in range(len(params)) if f"stages.{i}.name" in params]
    pending = [n for n in names if n not in ended]
    last_end = max((step for step, _ in boundaries), default=-1)
    later = any(step > last_end for k, v in history.items() if not STAGE_METRIC.match(k) for step, _ in v)
    return pending[0] if pending and later else None

# ---------------------------------------------------------------------------------------------- drawing


def _draw(out: Path, title: str, panels: dict[str, list[str]], history: dict[str, list[tuple[int, float]]],
          boundaries: list[tuple[int, str]], running: str | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 10), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True)
    last_step = max((s for v in history.values() for s, _ in v), default=1)
    ylabels = {"Training reward (sampled groups)": "reward / accuracy",
               "Held-out accuracy (greedy; sampled = avg@k)": "accuracy",
               "Losses": "loss"}
    for ax, (panel, keys) in zip(axes, panels.items(), strict=True):
        _draw_stages(ax, boundaries, running, last_step)
        for i, key in enumerate(keys):
            points = history[key] if key in EVAL_KEYS else _break_at_stages(history[key], boundaries)
            steps, values = zip(*points, strict=True)
            sparse = len(steps) <= 12  # eval points: few, joined with markers
            # line styles differ so equal series (reward/mean == reward/accuracy for a 0/1 reward) stay visible
            ax.plot(steps, values, label=key, marker="ox^s"[i % 4] if sparse else None, markersize=4,
                    linewidth=1.4, linestyle=("-", "--", "-.", ":")[i % 4], markerfacecolor="none")
        ax.margins(y=0.12)  # headroom for the stage names
        if not keys:
            ax.text(0.5, 0.5, "nothing logged for this panel yet", transform=ax.transAxes, ha="center",
                    va="center", color="0.5")
        ax.set_title(panel, loc="left", fontsize=11)
        ax.set_ylabel(ylabels.get(panel, "value"))
        ax.set_xlabel("global step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.grid(True, alpha=0.3)
        if keys:
            ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.suptitle(title, fontsize=12)
    fig.savefig(out, format="png")


def _break_at_stages(points: list[tuple[int, float]], boundaries: list[tuple[int, str]]) -> list[tuple[float, float]]:
    """Insert a NaN gap where a stage ends between two points, so one stage's curve never joins the next
    (rollout rewards and gspo rewards; sft LM loss and mpo loss are different quantities)."""
    out: list[tuple[float, float]] = []
    for (s0, v0), (s1, _) in zip(points, points[1:] + [(None, None)], strict=True):
        out.append((s0, v0))
        if s1 is not None and any(s0 <= end < s1 for end, _ in boundaries):
            out.append(((s0 + s1) / 2, float("nan")))
    return out


def _draw_stages(ax, boundaries: list[tuple[int, str]], running: str | None, last_step: int) -> None:
    """Dashed line at each stage end; the stage name centred over its span at the top; spans shaded in turn."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    spans, start = [], 0
    for end, name in boundaries:
        spans.append((start, end, name))
        start = end
    if running:
        spans.append((start, max(last_step, start), f"{running} (running)"))
    for i, (lo, hi, name) in enumerate(spans):
        if i % 2 and hi > lo:
            ax.axvspan(lo, hi, color="0.93", zorder=0)
        ax.text((lo + hi) / 2, 0.98, name, transform=top, ha="center", va="top", fontsize=9, color="0.25",
                rotation=0 if hi - lo >= 0.06 * max(last_step, 1) else 90)
    for end, _ in boundaries:
        ax.axvline(end, color="0.35", linestyle="--", linewidth=1.0, zorder=1)
