"""The stage↔group boundary: what the stage loops call on the learner, rollout and reward groups.

``actors/group.py``'s ``LearnerGroup``, ``RolloutGroup`` and ``RewardGroup`` implement these on Ray; the fast stage
tests run the same loops against in-process fakes (``tests/stages/fakes.py``). A method listed here is one a stage
or the run context calls, with the parameters it passes, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..types import PairBatch, RewardResult, Sample, SequenceBatch

if TYPE_CHECKING:
    from ..actors.group import GenerateResult, PromptInput  # the group API re-exports them


class EncoderProtocol(Protocol):
    """Chat-template prompts and response texts to token ids (``batching.Encoder`` with the policy's tokenizer)."""

    def prompt(self, messages: list[dict[str, Any]], images: list[str] | tuple[str, ...] = ()) -> list[int]: ...

    def response(self, text: str, *, add_eos: bool = True) -> list[int]: ...


class LearnerGroupProtocol(Protocol):
    """Data-parallel learner ranks behind one object; every ``train_*`` call is one optimizer step."""

    def compute_logprobs(self, batch: SequenceBatch) -> list[list[float]]: ...

    def compute_pair_logps(self, batch: PairBatch) -> tuple[list[float], list[float]]: ...

    def train_policy(self, batch: SequenceBatch, *, loss: str, clip_low: float, clip_high: float,
                     num_global_seqs: int | None = None, num_global_tokens: int | None = None,
                     old_is_current: bool = False) -> dict[str, float]: ...

    def train_mpo(self, batch: PairBatch, *, terms: list[tuple[str, float]], beta: float,
                  num_global_pairs: int | None = None) -> dict[str, float]: ...

    def train_sft(self, batch: SequenceBatch, *, num_global_tokens: int | None = None) -> dict[str, float]: ...

    def set_lr(self, lr: float, total_steps: int, warmup_steps: int) -> None: ...

    def skip_lr_steps(self, num_steps: int) -> None: ...

    def save_checkpoint(self, folder: str, client_state: dict) -> None: ...

    def load_checkpoint(self, folder: str) -> dict: ...

    def export_hf(self, folder: str) -> None: ...

    def shutdown(self) -> None: ...


class RolloutGroupProtocol(Protocol):
    """Generation workers; ``submit`` starts a call and returns a function that waits for its result."""

    def generate(self, prompts: list[PromptInput], n: int, greedy: bool = False,
                 key: int | None = None) -> GenerateResult: ...

    def submit(self, prompts: list[PromptInput], n: int, greedy: bool = False,
               key: int | None = None) -> Callable[[], GenerateResult]: ...

    def sync_from(self, learners: Any, version: int) -> float: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def shutdown(self) -> None: ...


class RewardGroupProtocol(Protocol):
    """Reward workers; ``score`` keeps the order of the samples; ``num_restarts`` counts replaced workers."""

    num_restarts: int

    def score(self, samples: list[Sample]) -> list[RewardResult]: ...

    def shutdown(self) -> None: ...
