"""In-process fakes of the stage↔group boundary (``cascade_rl/stages/protocols.py``): no Ray, vLLM or DeepSpeed.

``FakeRollout`` answers deterministically: prompt ``p<k>`` with ``metadata["num_right"] = r`` gets its first ``r``
of ``n`` samples right (text = the answer) and the rest wrong, so pass rates and all-equal groups are chosen by
the test. Every generation carries the policy version the fake had when the call was *submitted*.
``FakeLearner`` records every call and keeps a schedule step counter like the real learner.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cascade_rl.actors.rollout import GenerateResult

from cascade_rl.config import RecipeConfig, StageConfig
from cascade_rl.data.prompts import PromptItem
from cascade_rl.stages.context import RunContext
from cascade_rl.stages.protocols import (
    EncoderProtocol,
    LearnerGroupProtocol,
    RewardGroupProtocol,
    RolloutGroupProtocol,
)
from cascade_rl.types import Generation, PairBatch, RewardResult, Sample, SequenceBatch


def make_prompts(num_right: list[int]) -> list[PromptItem]:
    """Prompt ``p<k>`` (answer ``str(k)``) whose samples are right for the first ``num_right[k]`` of each group."""
    return [PromptItem(id=f"p{k}", messages=[{"role": "user", "content": f"q{k}"}], answer=str(k),
                       metadata={"num_right": r}) for k, r in enumerate(num_right)]


class FakeRollout:
    def __init__(self) -> None:
        self.version = 0
        self.calls: list[dict[str, Any]] = []  # one per submit: prompt ids, n, key, version at submit

    def submit(self, prompts: list[Any], n: int, greedy: bool = False,
               key: int | None = None) -> Callable[[], GenerateResult]:
        version = self.version
        self.calls.append({"prompts": [p.id for p in prompts], "n": n, "key": key, "version": version,
                           "greedy": greedy})
        gens = []
        for i, p in enumerate(prompts):
            for j in range(n):
                right = j < int(p.metadata.get("num_right", 0))
                text = str(p.answer) if right else "wrong"
                tokens = [10 + j] * (1 + j % 3)  # lengths 1, 2, 3, 1, ...
                gens.append(Generation(prompt_index=i, sample_index=j, text=text, token_ids=tokens,
                                       logprobs=[-0.25] * len(tokens), finish_reason="stop", num_prompt_tokens=2,
                                       prompt_token_ids=[1, 2], policy_version=version))
        result = GenerateResult(generations=gens, num_output_tokens=sum(len(g.token_ids) for g in gens),
                                generate_s=0.01, num_prompts=len(prompts), policy_version=version)
        return lambda: result

    def generate(self, prompts: list[Any], n: int, greedy: bool = False, key: int | None = None) -> GenerateResult:
        return self.submit(prompts, n, greedy, key)()

    def sync_from(self, learners: Any, version: int) -> float:
        self.version = version
        return 0.0

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class FakeReward:
    """1.0 and correct when the response equals the ground truth, else 0.0."""

    num_restarts = 0

    def score(self, samples: list[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            right = s.response == s.ground_truth
            out.append(RewardResult(total=float(right), components={"match": float(right)}, correct=right))
        return out

    def shutdown(self) -> None:
        pass


class FakeLearner:
    """Records calls; ``train_policy`` reports ``ratio_min``/``ratio_max``/``loss`` from the batch it got.

    Its policy gives every token log-prob ``logprob`` (``compute_logprobs``) before the first update and
    ``current_logprob`` in an ``old_is_current`` update's own forward, which it compares with the log-probs it was
    given (``behaviour_logprob_gap``, as the real learner does).
    """

    def __init__(self, logprob: float = -0.25, current_logprob: float = -0.25) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.schedule_step = 0
        self.schedule_total: int | None = None
        self.logprob, self.current_logprob = logprob, current_logprob

    def compute_logprobs(self, batch: SequenceBatch) -> list[list[float]]:
        self.calls.append(("compute_logprobs", {"n": len(batch)}))
        return [[self.logprob] * len(r) for r in batch.response_token_ids]

    def compute_pair_logps(self, batch: PairBatch) -> tuple[list[float], list[float]]:
        return [-1.0] * len(batch), [-2.0] * len(batch)

    def train_policy(self, batch: SequenceBatch, *, loss: str, clip_low: float, clip_high: float,
                     num_global_seqs: int | None = None, num_global_tokens: int | None = None,
                     old_is_current: bool = False) -> dict[str, float]:
        self.calls.append(("train_policy", {"n": len(batch), "num_global_seqs": num_global_seqs,
                                            "num_global_tokens": num_global_tokens, "loss": loss,
                                            "old_logprobs": batch.old_logprobs, "old_is_current": old_is_current}))
        self.schedule_step += 1
        n = float(len(batch))
        out = {"loss": n, "ratio_min": 1.0 - n / 100, "ratio_max": 1.0 + n / 100}
        if old_is_current and batch.old_logprobs is not None:
            given = [abs(b - self.current_logprob) for row in batch.old_logprobs for b in row]
            out["behaviour_logprob_gap"] = sum(given) / len(given)
        return out

    def train_mpo(self, batch: PairBatch, *, terms: list[tuple[str, float]], beta: float,
                  num_global_pairs: int | None = None) -> dict[str, float]:
        self.calls.append(("train_mpo", {"n": len(batch), "num_global_pairs": num_global_pairs}))
        self.schedule_step += 1
        return {"loss": 0.5}

    def train_sft(self, batch: SequenceBatch, *, num_global_tokens: int | None = None) -> dict[str, float]:
        self.calls.append(("train_sft", {"n": len(batch), "num_global_tokens": num_global_tokens}))
        self.schedule_step += 1
        return {"loss": 1.0}

    def set_lr(self, lr: float, total_steps: int, warmup_steps: int) -> None:
        self.calls.append(("set_lr", {"lr": lr, "total_steps": total_steps}))
        self.schedule_step, self.schedule_total = 0, total_steps

    def skip_lr_steps(self, num_steps: int) -> None:
        self.calls.append(("skip_lr_steps", {"num_steps": num_steps}))
        self.schedule_step += num_steps

    def save_checkpoint(self, folder: str, client_state: dict) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        state = {"client_state": client_state, "schedule_step": self.schedule_step, "total": self.schedule_total}
        (Path(folder) / "fake.json").write_text(json.dumps(state))

    def load_checkpoint(self, folder: str) -> dict:
        state = json.loads((Path(folder) / "fake.json").read_text())
        self.schedule_step, self.schedule_total = state["schedule_step"], state["total"]
        return state["client_state"]

    def export_hf(self, folder: str) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class FakeTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        pass

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.metrics if key in m]


class FakeEncoder:
    def prompt(self, messages: list[dict[str, Any]], images: Any = ()) -> list[int]:
        return [1, 2]

    def response(self, text: str, *, add_eos: bool = True) -> list[int]:
        return [3] * max(len(text), 1) + ([0] if add_eos else [])


def make_ctx(run_dir: Path, stages: list[StageConfig], prompts: list[PromptItem], *, group_size: int = 4,
             every_steps: int = 0) -> RunContext:
    cfg = RecipeConfig(stages=stages)
    cfg.rollout.group_size = group_size
    cfg.eval.every_steps = 0
    cfg.checkpoint.every_steps = every_steps
    learners: LearnerGroupProtocol = FakeLearner()
    rollout: RolloutGroupProtocol = FakeRollout()
    rewards: RewardGroupProtocol = FakeReward()
    encoder: EncoderProtocol = FakeEncoder()
    return RunContext(cfg=cfg, run_dir=run_dir, model_path="", tracker=FakeTracker(),  # type: ignore[arg-type]
                      learners=learners, rollout=rollout, rewards=rewards, train_prompts=prompts,
                      eval_prompts=prompts[:2], encoder=encoder)
