"""``gspo`` stage: the online loop — generate G per prompt → score → group advantages → update → sync → log.

No reference model and no KL term (InternVL3.5). ``gspo.loss`` picks GSPO, GSPO-token or GRPO; the clip range
is explicit in the recipe (paper 3e-4/4e-4; InternVL's released scripts 0.2/0.2 with 16 mini-batches, where the
sequence ratio actually moves away from 1).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..algos.advantages import compute_group_advantages
from ..config import StageConfig
from ..data.pass_rate import compute_pass_rates, filter_prompts_by_pass_rate
from ..data.rollout_log import RolloutLogWriter, list_shards, read_rollout_log, shard_range
from ..types import SequenceBatch
from .batching import epoch_order
from .context import RunContext, reward_metrics, rollout_metrics
from .rollout import log_dir, make_records


def run_gspo(ctx: RunContext, stage: StageConfig, index: int) -> None:
    g, G = stage.gspo, ctx.cfg.rollout.group_size
    prompts = _select_prompts(ctx, stage, index)
    writer = _open_log(ctx, stage)
    ctx.start_schedule(stage.lr or ctx.cfg.learner.lr, g.num_steps * g.num_minibatches)
    bar = tqdm(total=g.num_steps, initial=ctx.state.stage_step, desc=f"[{stage.name}] {g.loss}", unit="step")
    pending = None  # with gspo.overlap: the next batch, generating while this one trains
    orders: dict[int, list[int]] = {}  # epoch -> shuffled order, computed once per epoch
    for step in range(ctx.state.stage_step, g.num_steps):
        t_step = time.perf_counter()
        batch_prompts = _prompts_for_step(prompts, step, g.prompts_per_step, ctx.cfg.seed, orders)
        out = (pending or ctx.rollout.submit(batch_prompts, G, key=ctx.sample_key(step)))()  # generate
        pending = None
        if g.overlap and step + 1 < g.num_steps:
            next_prompts = _prompts_for_step(prompts, step + 1, g.prompts_per_step, ctx.cfg.seed, orders)
            pending = ctx.rollout.submit(next_prompts, G, key=ctx.sample_key(step + 1))
        t0 = time.perf_counter()
        results = ctx.score(batch_prompts, out.generations)                            # score
        score_s = time.perf_counter() - t0
        writer.append(make_records(ctx, stage, step, batch_prompts, out, results))      # log
        adv = compute_group_advantages(torch.tensor([r.total for r in results], dtype=torch.float32), G,
                                       scale_std=g.scale_std, filter_equal=g.filter_equal_groups)
        keep = [i for i in range(len(results)) if adv.mask[i] > 0]                     # dynamic filtering
        if ctx.cfg.rollout.sleep_when_idle:
            ctx.rollout.sleep()                                                        # free GPU memory
        t0 = time.perf_counter()
        train_metrics = _update(ctx, stage, out.generations, adv.advantages.tolist(), keep)
        train_s = time.perf_counter() - t0
        sync_s = ctx.sync_weights() if keep else 0.0                                   # sync
        ctx.finish_step({**rollout_metrics(out), **reward_metrics(results), **train_metrics,       # count, log
                         "train/filtered_groups": float(adv.num_filtered_groups),
                         "train/num_sequences": float(len(keep)), "perf/score_s": score_s, "perf/train_s": train_s,
                         "perf/sync_s": sync_s, "perf/step_s": time.perf_counter() - t_step,
                         "train/policy_version": ctx.state.policy_version})
        bar.update(1)
        bar.set_postfix(reward=f"{sum(r.total for r in results) / len(results):.3f}")
        if ctx.cfg.eval.every_steps > 0 and ctx.state.stage_step % ctx.cfg.eval.every_steps == 0 \
                and ctx.state.stage_step < g.num_steps:
            ctx.evaluate(stage.name)
        if ctx.should_checkpoint() and ctx.state.stage_step < g.num_steps:
            ctx.checkpoint(stage)
    bar.close()


def _update(ctx: RunContext, stage: StageConfig, gens: list, advantages: list[float], keep: list[int]) -> dict:
    """One or more mini-batch updates on the kept sequences; π_old is the policy before any update.

    The kept sequences are dealt round-robin into ``gspo.num_minibatches`` parts; an empty part (fewer kept
    sequences than parts, or nothing kept) is no update. On-policy, the first update starts from π_old itself,
    so its ratio's denominator is its own forward, detached (``old_is_current``, as TRL does with one iteration);
    only the later parts need old log-probs from the learner, in one pass before the first update. With
    ``gspo.overlap`` π_old is the behaviour policy (the engine's log-probs): the learner has moved one update past
    it. Metrics are means over the updates run (``*_min`` / ``*_max``: the min / max over them). The LR schedule
    has ``num_steps × num_minibatches`` steps and each skipped update still advances it one step
    (``skip_lr_steps``), so the LR is a function of the rollout step, as in verl, and a stage ends at the
    schedule's end however many groups dynamic filtering dropped.
    """
    g = stage.gspo
    parts = [keep[j :: g.num_minibatches] for j in range(g.num_minibatches)]
    parts = [p for p in parts if p]
    if len(parts) < g.num_minibatches:
        ctx.learners.skip_lr_steps(g.num_minibatches - len(parts))
    if not parts:
        return {}
    behaviour = {i: list(gens[i].logprobs) for i in keep}  # the engine's; empty with rollout.behaviour_logprobs=false
    logged = all(len(gens[i].logprobs) == len(gens[i].token_ids) for i in keep)
    old = dict(behaviour) if g.overlap else {}
    if not g.overlap and len(parts) > 1:  # the later parts' π_old, before the first update moves the policy
        later = [i for p in parts[1:] for i in p]
        old.update(zip(later, ctx.learners.compute_logprobs(_sequences(gens, advantages, later)), strict=True))
    runs, gaps = [], []
    for k, part in enumerate(parts):
        first_on_policy = k == 0 and not g.overlap
        mb = _sequences(gens, advantages, part)
        if first_on_policy:  # π_old is this update's own forward: the engine's log-probs go along only to be compared
            mb.old_logprobs = [behaviour[i] for i in part] if logged else None
        else:
            mb.old_logprobs = [old[i] for i in part]
        runs.append(ctx.learners.train_policy(mb, loss=g.loss, clip_low=g.clip_low, clip_high=g.clip_high,
                                              num_global_seqs=len(mb), old_is_current=first_on_policy,
                                              num_global_tokens=sum(map(len, mb.response_token_ids))))
        # engine vs learner on the same tokens: near 0 when weight sync works; growing = a stale or partial sync.
        # Absent with rollout.behaviour_logprobs=false, and with overlap (π_old is then the engine's own log-probs).
        if g.overlap or not logged:
            continue
        n = sum(len(gens[i].token_ids) for i in part)
        gaps.append((runs[-1].pop("behaviour_logprob_gap") * n if first_on_policy else
                     sum(abs(b - o) for i in part for b, o in zip(behaviour[i], old[i], strict=True)), n))
    perf = {"step_s": "perf/learner_step_s", "peak_mem_gib": "perf/learner_peak_mem_gib"}
    out = {perf.get(key, f"train/{key}"): v for key, v in combine_minibatch_metrics(runs).items()}
    if gaps and sum(n for _, n in gaps):
        out["rollout/behaviour_logprob_gap"] = sum(s for s, _ in gaps) / sum(n for _, n in gaps)
    return out


def _sequences(gens: list, advantages: list[float], rows: list[int]) -> SequenceBatch:
    """The learner's batch of generations ``rows`` (their advantages; old log-probs set by the caller)."""
    return SequenceBatch(prompt_token_ids=[list(gens[i].prompt_token_ids) for i in rows],
                         response_token_ids=[list(gens[i].token_ids) for i in rows],
                         advantages=[advantages[i] for i in rows])


def combine_minibatch_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """One dict from the metrics of the mini-batch updates run: ``*_min`` the min, ``*_max`` the max, else the
    mean over the updates (each key over the updates that reported it)."""
    keys = list(dict.fromkeys(k for m in runs for k in m))
    out: dict[str, float] = {}
    for k in keys:
        vals = [float(m[k]) for m in runs if k in m]
        out[k] = min(vals) if k.endswith("_min") else max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out


def _select_prompts(ctx: RunContext, stage: StageConfig, index: int) -> list:
    """Training prompts, kept to the pass-rate band measured by the latest earlier rollout stage (if any)."""
    g = stage.gspo
    earlier = [s for s in ctx.cfg.stages[:index] if s.kind == "rollout"]
    if not earlier or (g.pass_rate_min <= 0.0 and g.pass_rate_max >= 1.0):
        return ctx.train_prompts
    rates = compute_pass_rates(read_rollout_log(log_dir(ctx, earlier[-1].name)))
    kept, stats = filter_prompts_by_pass_rate([p.id for p in ctx.train_prompts], rates, g.pass_rate_min, g.pass_rate_max)
    ctx.log({f"data/pass_rate_{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    keep = set(kept)
    chosen = [p for p in ctx.train_prompts if p.id in keep]
    if not chosen:
        raise RuntimeError(f"stage `{stage.name}`: no prompt has a logged pass rate in "
                           f"[{g.pass_rate_min}, {g.pass_rate_max}]; widen gspo.pass_rate_min/max")
    return chosen


def _prompts_for_step(prompts: list, step: int, per_step: int, seed: int,
                      orders: dict[int, list[int]] | None = None) -> list:
    """Deterministic data position: step * per_step into a per-epoch shuffle of the prompts. Each epoch's order is
    computed once and kept in ``orders`` (pass the same dict for every step of a stage)."""
    orders = {} if orders is None else orders
    start = step * per_step
    out = []
    for pos in range(start, start + per_step):
        epoch, i = divmod(pos, len(prompts))
        if epoch not in orders:
            for old in [e for e in orders if e < epoch - 1]:  # steps move forward: keep this epoch and the last
                del orders[old]
            orders[epoch] = epoch_order(len(prompts), seed, epoch)
        out.append(prompts[orders[epoch][i]])
    return out


def _open_log(ctx: RunContext, stage: StageConfig) -> RolloutLogWriter:
    """Shards written after the checkpoint we resume from are moved aside (kept, not counted)."""
    folder: Path = log_dir(ctx, stage.name)
    keep = ctx.state.num_log_shards.get(stage.name, 0)  # shard index (not file count) at the checkpoint
    later = [s for s in (list_shards(folder) if folder.is_dir() else []) if (shard_range(s) or ("", keep, 0))[1] >= keep]
    if later:
        aside = folder.parent / f"{stage.name}.superseded" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for s in later:
            shutil.move(str(s), aside / s.name)
    return RolloutLogWriter(folder)
