"""Types shared by the rollout worker and its backends (``rollout.py`` for vLLM, ``rollout_hf.py`` for
transformers): the spec, the rendered prompt, a raw sample, the generate result, the backend Protocol.

They live apart from both so that neither backend module imports the other at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cascade_rl.hf import PromptRenderer, RenderedPrompt  # noqa: F401  (RenderedPrompt re-exported)
from cascade_rl.types import Generation, WorkerSpec

PromptInput = tuple[list[dict[str, Any]], list[str]]  # (chat messages, image file paths)


class RolloutEngineError(RuntimeError):
    """The generation engine could not start or ran out of memory; the message names the recipe key to change."""


@dataclass
class RolloutSpec(WorkerSpec):
    """What a rollout worker needs: ``WorkerSpec`` + the fields of ``model.*`` / ``rollout.*`` of the same names."""

    backend: str
    dtype: str
    max_response_tokens: int
    max_prompt_tokens: int
    temperature: float
    top_p: float
    gpu_memory_utilization: float
    kv_cache_gib: int
    enforce_eager: bool
    compile: bool  # vLLM torch.compile (GPU, not eager); off: whole-model CUDA graphs for decoding only
    sleep_when_idle: bool
    engine_process: str  # auto | inline | separate: vLLM's engine core in this actor or a child process
    behaviour_logprobs: bool
    ignore_eos: bool
    max_images_per_prompt: int
    max_tiles: int  # InternVL tiles per image cap (model.max_tiles; 0: the model folder's setting)
    hf_max_batch_sequences: int
    tensor_parallel_size: int  # vLLM processes (one per GPU) of this worker's engine


@dataclass
class RawSample:
    """One sampled response as a backend returns it, before it becomes a ``Generation``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS / stop token) | "length" (max_response_tokens) | "abort"
    prompt_token_ids: list[int]
    text: str


@dataclass
class GenerateResult:
    """``generations`` are ordered by prompt, then sample: ``len == len(prompts) * n``."""

    generations: list[Generation]
    num_output_tokens: int
    generate_s: float
    num_prompt_tokens: int = 0
    tokenize_s: float = 0.0
    policy_version: int = 0
    num_prompts: int = 0

    @staticmethod
    def concat(parts: list[GenerateResult], generate_s: float) -> GenerateResult:
        """Join per-worker results (each over a contiguous slice of the prompts) back into prompt order."""
        generations: list[Generation] = []
        offset = 0
        for part in parts:
            for g in part.generations:
                g.prompt_index += offset
            generations += part.generations
            offset += part.num_prompts
        return GenerateResult(
            generations=generations,
            num_output_tokens=sum(p.num_output_tokens for p in parts),
            generate_s=generate_s,
            num_prompt_tokens=sum(p.num_prompt_tokens for p in parts),
            tokenize_s=max((p.tokenize_s for p in parts), default=0.0),
            policy_version=min((p.policy_version for p in parts), default=0),
            num_prompts=offset,
        )


class Backend(Protocol):
    """What ``RolloutWorker`` needs from an engine."""

    tokenizer: Any
    renderer: PromptRenderer  # chat template + image expansion (cascade_rl.hf), shared with the learner

    def sample(self, prompts: list[RenderedPrompt], n: int, *, greedy: bool,
               seeds: list[int]) -> list[list[RawSample]]: ...
    def compute_logprobs(self, prompt_token_ids: list[list[int]],
                         response_token_ids: list[list[int]]) -> list[list[float]]: ...
    def load_weights(self, named_tensors: list[tuple[str, Any]]) -> None: ...
    def sleep(self) -> None: ...
    def wake_up(self) -> None: ...
    def shutdown(self) -> None: ...
