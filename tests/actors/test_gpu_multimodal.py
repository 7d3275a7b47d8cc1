"""GPU only: vLLM serves the tiny InternVL; its prompt ids, and its behaviour log-probs of the responses it
samples, equal what the learner computes for the same multimodal prompts (colocated on one GPU).

Prompts: one image (1 tile), two images (4 + 3 tiles with ``max_tiles=4``), text only, in one generate call and
one learner batch. vLLM gets one placeholder per image and expands it itself; the worker checks the ids it
reports against ``cascade_rl.hf.PromptRenderer`` (``PromptMismatchError`` otherwise). Both sides run bfloat16
with different kernels and image preprocessing (vLLM's torchvision image processor vs the same one in the
learner's process), so equality is within bf16 rounding. Prints max and mean |Δ log-prob| at the start and after a
GSPO step with the vision tower frozen (``learner.freeze_vision``: not re-sent) and a weight sync; the step must
first move the learner by more than the tolerance, so a stale engine would fail.

Run with ``pytest -m gpu -s tests/actors/test_gpu_multimodal.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu

TOL_MAX, TOL_MEAN = 0.1, 0.01  # bf16 on both sides; a wrong image or token layout moves log-probs by ~1
MAX_TILES = 4


def _gap(learners: Any, out: Any, prompts: list, when: str) -> tuple[float, float]:
    """(max, mean) |vLLM behaviour log-prob - learner log-prob| over every sampled token."""
    from cascade_rl.types import SequenceBatch

    gens = out.generations
    batch = SequenceBatch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens],
                          images=[prompts[g.prompt_index][1] for g in gens])
    d = [abs(a - b) for g, lp in zip(gens, learners.compute_logprobs(batch), strict=True)
         for a, b in zip(g.logprobs, lp, strict=True)]
    print(f"VLM {when}: vLLM behaviour vs learner log-probs over {len(d)} tokens: max |Δ| {max(d):.4f}, "
          f"mean |Δ| {sum(d) / len(d):.5f}")
    return max(d), sum(d) / len(d)


def test_vllm_vlm_behaviour_logprobs_equal_the_learners(tiny_vlm: Path, make_rollout_spec: Any,
                                                        make_learner_spec: Any, tmp_path: Path) -> None:
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        pytest.skip("needs a CUDA GPU and vLLM")
    import ray
    from cascade_rl.actors.group import LearnerGroup, RolloutGroup, make_placement

    from cascade_rl.hf import PromptRenderer
    from cascade_rl.types import SequenceBatch

    paths = []
    for name, size in (("red", (64, 64)), ("wide", (160, 64)), ("tall", (64, 128))):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.effect_noise(size, 60).convert("RGB").save(paths[-1])  # texture, so the pixels matter
    user = lambda *parts: [{"role": "user", "content": list(parts)}]  # noqa: E731
    prompts = [(user({"type": "image"}, {"type": "text", "text": "What colour?"}), paths[:1]),
               (user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is wider?"}), paths[1:]),
               ([{"role": "user", "content": "What is 2 + 2?"}], [])]
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)
    placement = make_placement("colocated", num_learner_ranks=1, num_gpus_per_rank=0.5, num_rollout_workers=1,
                               num_gpus_per_worker=0.5)
    learners = LearnerGroup(make_learner_spec(tiny_vlm, dtype="bfloat16", is_vlm=True, max_tiles=MAX_TILES,
                                              freeze_vision=True),
                            num_ranks=1, placement=placement.learner)
    rollout = RolloutGroup(make_rollout_spec(tiny_vlm, dtype="bfloat16", gpu_memory_utilization=0.3, is_vlm=True,
                                             max_tiles=MAX_TILES), num_workers=1, placement=placement.rollout)
    try:
        out = rollout.generate(prompts, 8)
        renderer = PromptRenderer(str(tiny_vlm), max_tiles=MAX_TILES)
        rendered = [renderer.render(m, i) for m, i in prompts]
        assert [g.prompt_token_ids for g in out.generations] == [rendered[g.prompt_index].token_ids
                                                                 for g in out.generations]
        assert [r.num_tiles for r in rendered] == [[1], [4, 3], []]
        worst, mean = _gap(learners, out, prompts, "start")
        assert worst < TOL_MAX and mean < TOL_MEAN, (worst, mean)
        # one step with the vision tower frozen (not re-sent), sync, sample again: the engine must hold the new
        # language model and its own, unchanged vision tower
        gens = out.generations
        step = SequenceBatch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens],
                             advantages=[1.0 if i % 2 else -1.0 for i in range(len(gens))],
                             old_logprobs=[g.logprobs for g in gens], images=[prompts[g.prompt_index][1] for g in gens])
        learners.train_policy(step, loss="gspo", clip_low=0.2, clip_high=0.2)
        assert _gap(learners, out, prompts, "stale (before the sync)")[0] > TOL_MAX  # else the check can't fail
        rollout.sync_from(learners, version=1)
        worst, mean = _gap(learners, rollout.generate(prompts, 8), prompts, "after a frozen-vision sync")
        assert worst < TOL_MAX and mean < TOL_MEAN, (worst, mean)
    finally:
        rollout.shutdown()
        learners.shutdown()
        placement.remove()
        if started:
            ray.shutdown()
