"""Records and batches exchanged between stages, actors and rewards.

Plain dataclasses with no heavy imports, so every layer (rewards included) may import this module.

- ``Sample``          one response to score: what a reward function receives.
- ``RewardResult``    what scoring one sample produced: the weighted total, each component, errors.
- ``Generation``      one sampled response as the rollout worker returns it.
- ``RolloutRecord``   one logged response (a row of a rollout-log parquet shard).
- ``PreferencePair``  one (chosen, rejected) pair for MPO.
- ``SequenceBatch``   what the learner trains on: prompt/response token ids and per-sequence extras.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One response to score. ``prompt`` is the chat messages; ``images`` are file paths."""

    prompt: list[dict[str, Any]]
    response: str
    ground_truth: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)


@dataclass
class RewardResult:
    """Scores of one sample: ``total`` is the weighted sum of the components that applied."""

    total: float
    components: dict[str, float] = field(default_factory=dict)
    correct: bool | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Generation:
    """One sampled response with its token ids and the behaviour policy's log-probs."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    num_prompt_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    policy_version: int = 0
    image_sha256: list[str] = field(default_factory=list)  # per prompt image: content hash of the file
    image_tiles: list[int] = field(default_factory=list)  # per prompt image: tiles it was expanded to


@dataclass
class RolloutRecord:
    """One logged response. ``record_id`` is deterministic, so a resumed run can skip what it has."""

    record_id: str
    run_id: str
    stage: str
    step: int
    policy_version: int
    prompt_id: str
    prompt: str  # JSON of the chat messages
    images: list[str]
    ground_truth: str | None
    response: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    rewards: str  # JSON of {component: score}
    reward: float
    correct: bool | None
    finish_reason: str
    num_prompt_tokens: int
    num_response_tokens: int
    generate_s: float
    error: str | None = None
    image_sha256: list[str] = field(default_factory=list)  # per image: what re-renders the prompt exactly
    image_tiles: list[int] = field(default_factory=list)

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return json.loads(self.prompt)

    @property
    def reward_components(self) -> dict[str, float]:
        return json.loads(self.rewards)


@dataclass
class PreferencePair:
    """A (chosen, rejected) pair for MPO, with how it was built and, once computed, reference log-probs."""

    pair_id: str
    prompt_id: str
    prompt: str  # JSON of the chat messages
    images: list[str]
    chosen: str
    rejected: str
    prompt_token_ids: list[int]
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    method: str  # correctness | prm_margin | dropout_ntp
    source_ids: list[str]
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SequenceBatch:
    """Sequences for the learner: each is prompt tokens followed by response tokens.

    Only response tokens carry loss. ``advantages`` (one per sequence) and ``old_logprobs`` (one per response
    token) are set for policy-gradient losses; ``images`` (file paths per sequence) for VLM batches.
    """

    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]
    advantages: list[float] | None = None
    old_logprobs: list[list[float]] | None = None
    images: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompt_token_ids, self.response_token_ids, strict=True))

    def select(self, indices: list[int]) -> SequenceBatch:
        def pick(xs: list | None) -> list | None:
            return None if xs is None else [xs[i] for i in indices]

        return SequenceBatch(
            prompt_token_ids=[self.prompt_token_ids[i] for i in indices],
            response_token_ids=[self.response_token_ids[i] for i in indices],
            advantages=pick(self.advantages),
            old_logprobs=pick(self.old_logprobs),
            images=pick(self.images),
        )


@dataclass
class PairBatch:
    """Preference pairs for the MPO loss, tokenised; reference log-probs are sums over response tokens."""

    prompt_token_ids: list[list[int]]
    chosen_token_ids: list[list[int]]
    rejected_token_ids: list[list[int]]
    ref_chosen_logps: list[float] | None = None
    ref_rejected_logps: list[float] | None = None
    images: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class WorkerSpec:
    """What every worker spec holds besides its recipe fields (which keep the names, defaults and docs of
    ``cascade_rl/config.py``; no defaults here). Specs are built from the recipe by ``stages/workers.py``."""

    model_path: str  # derived: the policy folder this stage starts from
    seed: int  # derived: the recipe's seed
    is_vlm: bool  # derived: the model folder has a vision config


@dataclass
class RewardTermConfig:
    """One weighted reward term: the type of the recipe's ``reward.terms`` items, handed unchanged through the
    reward group and worker to the scorer (``rewards.registry.resolve_terms`` turns it into a callable term)."""

    name: str = field(metadata={"doc": "registered reward name or pkg.module:function"})
    weight: float = field(default=1.0, metadata={"doc": "weight of this term in the total reward"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"doc": "keyword arguments passed to the reward"})
