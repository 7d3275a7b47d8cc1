"""LearnerWorker without Ray, on a tiny Qwen3 (and a tiny InternVL) on the CPU.

What is shown: log-probs equal a plain Hugging Face forward's log-softmax gather; packing, padding and the
micro-batch budget never change log-probs or the update; one GSPO / MPO / SFT step moves the weights; the MPO
reward shift survives a checkpoint; ``export_hf`` round-trips through transformers with identical logits; synced
weight names are the checkpoint's; 2 ranks (ZeRO-2, gloo) give the 1-rank loss, δ and weights on the same batch.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from cascade_rl.actors.learner import COMPLETE, LearnerSpec, LearnerWorker, LRSchedule

from cascade_rl.stages.workers import spec_with
from cascade_rl.types import PairBatch, SequenceBatch

pytestmark = pytest.mark.slow  # each test starts DeepSpeed (a few seconds); they still run in CI

MPO_TERMS = [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: OpenMP threads only spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_lm() -> str:
    from cascade_rl.data.tiny_models import build_tiny_lm

    return str(build_tiny_lm())


def make_worker(path: str, rank: int = 0, world_size: int = 1, port: int | None = None, **kw) -> LearnerWorker:
    spec = spec_with(LearnerSpec, path, **{"zero_stage": 2, "lr": 1e-3, "micro_batch_tokens": 64, **kw})
    return LearnerWorker(spec, rank, world_size, "127.0.0.1", port or free_port())


def random_batch(seed: int = 0, prompt_lens=(5, 9, 3, 7, 4, 6), response_lens=(6, 4, 8, 2, 5, 0)) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(10, 500, (n,), generator=g).tolist() for n in response_lens]
    advantages = (torch.rand(len(prompts), generator=g) * 2 - 1).tolist()
    return SequenceBatch(prompts, responses, advantages=advantages)


def with_old_logprobs(batch: SequenceBatch, logprobs: list[list[float]]) -> SequenceBatch:
    """Old log-probs a little off the current ones, so ratios differ from 1 and clipping is exercised.

    The offset depends on the sequence's content (first prompt token), not its index, so shards agree with the
    whole batch."""
    batch.old_logprobs = [[lp + 0.3 * ((p[0] + j) % 3 - 1) for j, lp in enumerate(row)]
                          for p, row in zip(batch.prompt_token_ids, logprobs, strict=True)]
    return batch


def weights(worker: LearnerWorker) -> dict[str, torch.Tensor]:
    return {n: t.clone() for bucket in worker.named_weights_for_sync() for n, t in bucket}


def hf_response_logprobs(model, prompt: list[int], response: list[int], **kw) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([prompt + response]), **kw).logits[0]  # (L, V)
    logp = logits.float().log_softmax(-1)[len(prompt) - 1 : -1]  # rows predicting the response
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.fixture(scope="module")
def worker(tiny_lm: str) -> LearnerWorker:
    """A read-only worker: tests using it must not train it."""
    return make_worker(tiny_lm)


def test_logprobs_equal_plain_hf_forward(worker: LearnerWorker, tiny_lm: str) -> None:
    from transformers import AutoModelForCausalLM

    batch = random_batch()
    got = worker.compute_logprobs(batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    with torch.no_grad():
        for p, r, lp in zip(batch.prompt_token_ids, batch.response_token_ids, got, strict=True):
            assert len(lp) == len(r)
            if r:
                torch.testing.assert_close(torch.tensor(lp), hf_response_logprobs(model, p, r), atol=1e-5, rtol=0)


def test_packing_padding_and_budget_never_change_logprobs(worker: LearnerWorker) -> None:
    batch = random_batch(seed=1)
    assert not worker._packed  # sdpa: padded rows by default (a packed row would cost total² attention)
    assert worker._packing_isolates_sequences(), "packed sequences must not see each other (use_cache=False)"
    assert worker.packing_check_diff == 0.0  # the neighbour's keys get attention weight exactly 0
    worker._packed = True
    whole = worker.compute_logprobs(batch)  # budget 64: sequences packed together
    worker.spec.micro_batch_tokens = 16  # one or two sequences per micro-batch
    one_by_one = worker.compute_logprobs(batch)
    worker._packed = False
    padded = worker.compute_logprobs(batch)
    worker.spec.micro_batch_tokens = 64
    for a, b, c in zip(whole, one_by_one, padded, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a), torch.tensor(c), atol=1e-5, rtol=0)


def test_budget_error_names_the_recipe_key(worker: LearnerWorker) -> None:
    batch = SequenceBatch([[1] * 60], [[2] * 10])
    with pytest.raises(ValueError, match="learner.micro_batch_tokens=64"):
        worker.compute_logprobs(batch)


def test_sync_names_are_checkpoint_names_in_buckets(worker: LearnerWorker, tiny_lm: str) -> None:
    from safetensors import safe_open

    buckets = list(worker.named_weights_for_sync(bucket_bytes=64 << 10))
    assert len(buckets) > 1
    for bucket in buckets:  # a bucket over the limit holds one tensor bigger than the limit
        assert len(bucket) == 1 or sum(t.numel() * t.element_size() for _, t in bucket) <= 64 << 10
    names = [n for b in buckets for n, _ in b]
    with safe_open(str(Path(tiny_lm) / "model.safetensors"), "pt") as f:
        assert sorted(names) == sorted(f.keys())
    assert [len(b) for b in worker.state_dict_for_sync(bucket_mb=1 / 16)] == [len(b) for b in buckets]


def test_gspo_step_moves_weights_and_layout_budget_checkpointing_do_not_change_the_update(tiny_lm: str) -> None:
    batch = random_batch(seed=2)
    results = []
    # whole batch in one padded micro-batch vs one or two packed sequences at a time with recomputation
    for budget, checkpointing, packing in ((64, False, "padded"), (16, True, "packed")):
        w = make_worker(tiny_lm, micro_batch_tokens=budget, gradient_checkpointing=checkpointing, packing=packing)
        before = weights(w)
        with_old_logprobs(batch, w.compute_logprobs(batch))
        tokens = sum(map(len, batch.response_token_ids))
        m = w.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2, num_global_seqs=len(batch),
                           num_global_tokens=tokens)
        assert torch.isfinite(torch.tensor(m["loss"])) and m["lr"] == pytest.approx(1e-3)
        assert m["grad_norm"] > 0 and 0 <= m["clip_frac_low"] <= 1 and m["num_tokens"] == batch.num_tokens
        after = weights(w)
        assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-4
        results.append((m, after))
    (m1, w1), (m2, w2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)  # the accumulated gradient itself
    for n in w1:  # Adam's first step is ~lr·sign(g): near-zero gradients may round differently, so 10% of lr
        torch.testing.assert_close(w1[n], w2[n], atol=1e-4, rtol=0)


def test_first_update_with_old_is_current_is_the_update_from_computed_old_logprobs(tiny_lm: str) -> None:
    """π_old = the step's own detached forward gives the loss, gradient and weights of the two-pass update
    (compute_logprobs, then train_policy): ratio 1 either way, so GSPO's loss is -Σ A / 6 over the sequences with
    response tokens (the 6th has none): -(0.5 - 1 + 2 + 0 + 0.25) / 6 = -1.75 / 6. The engine's log-probs it is
    given (old + 0.1 per token) are only compared: gap 0.1."""
    batch = random_batch(seed=2)
    batch.advantages = [0.5, -1.0, 2.0, 0.0, 0.25, -0.75]
    assert len(batch) == 6
    tokens = sum(map(len, batch.response_token_ids))
    kwargs = dict(loss="gspo", clip_low=0.2, clip_high=0.2, num_global_seqs=len(batch), num_global_tokens=tokens)
    results = []
    for old_is_current in (False, True):
        w = make_worker(tiny_lm, micro_batch_tokens=16, packing="packed")
        old = w.compute_logprobs(batch)
        batch.old_logprobs = [[x + 0.1 for x in row] for row in old] if old_is_current else old
        m = w.train_policy(batch, old_is_current=old_is_current, **kwargs)
        results.append((m, weights(w)))
    (m1, w1), (m2, w2) = results
    assert m1["loss"] == pytest.approx(-1.75 / 6, abs=1e-5) and m2["loss"] == pytest.approx(-1.75 / 6, abs=1e-6)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m2["behaviour_logprob_gap"] == pytest.approx(0.1, abs=1e-4) and "behaviour_logprob_gap" not in m1
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], atol=1e-4, rtol=0)
    batch.old_logprobs = None  # no π_old given and none to compute from: the error says which call gives one
    with pytest.raises(ValueError, match="old_is_current=True"):
        make_worker(tiny_lm).train_policy(batch, **kwargs)


@pytest.mark.parametrize("loss", ["gspo", "grpo"])
def test_policy_step_raises_positive_and_lowers_negative_advantage_sequences(tiny_lm: str, loss: str) -> None:
    """The sign check no invariance test can make: after a few updates with A = (+1, -1) on two sequences, the
    first one's mean response log-prob has gone up and the second one's down (with packing reordering them)."""
    batch = random_batch(seed=3, prompt_lens=(6, 4), response_lens=(5, 7))
    batch.advantages = [1.0, -1.0]
    w = make_worker(tiny_lm, lr=1e-2, micro_batch_tokens=16, packing="packed")

    def mean_logprobs() -> list[float]:
        return [sum(row) / len(row) for row in w.compute_logprobs(batch)]

    before = mean_logprobs()
    for _ in range(3):
        batch.old_logprobs = w.compute_logprobs(batch)  # on-policy each round: ratio 1, plain policy gradient
        w.train_policy(batch, loss=loss, clip_low=0.2, clip_high=0.2, num_global_seqs=2,
                       num_global_tokens=sum(map(len, batch.response_token_ids)))
    after = mean_logprobs()
    assert after[0] > before[0] + 0.05, (before, after)
    assert after[1] < before[1] - 0.05, (before, after)


def test_mpo_step_and_reward_shift_survive_checkpoint(tiny_lm: str, tmp_path: Path) -> None:
    w = make_worker(tiny_lm, warmup_steps=2, total_steps=4, lr_schedule="cosine")
    seqs = random_batch(seed=3)
    pairs = PairBatch(seqs.prompt_token_ids[:3], seqs.response_token_ids[:3], seqs.response_token_ids[3:6])
    chosen, rejected = w.compute_pair_logps(pairs)
    direct = w.compute_logprobs(SequenceBatch(pairs.prompt_token_ids, pairs.chosen_token_ids))
    assert chosen == pytest.approx([sum(x) for x in direct], abs=1e-4)
    # reference 1 nat below the policy on chosen, above on rejected: implicit rewards ±β, so δ moves
    pairs.ref_chosen_logps = [c - 1.0 for c in chosen]
    pairs.ref_rejected_logps = [r + 0.5 for r in rejected]
    m = w.train_mpo(pairs, terms=MPO_TERMS, beta=0.1, num_global_pairs=len(pairs))
    assert torch.isfinite(torch.tensor(m["loss"])) and m["rewards/accuracy"] == 1.0
    assert m["lr"] == pytest.approx(0.5e-3)  # warm-up step 1 of 2
    delta = w.reward_shift.state_dict()
    assert delta["count"] == 6 and delta["mean"] == pytest.approx((0.1 - 0.05) / 2, abs=1e-5)

    ckpt = tmp_path / "ckpt"
    w.save_checkpoint(str(ckpt), {"driver": {"stage_step": 1}})
    assert (ckpt / COMPLETE).is_file()
    saved = weights(w)
    w.train_mpo(pairs, terms=MPO_TERMS, beta=0.1, num_global_pairs=len(pairs))
    assert w.reward_shift.state_dict() != delta
    assert w.load_checkpoint(str(ckpt)) == {"driver": {"stage_step": 1}}
    assert w.reward_shift.state_dict() == delta
    for n, t in weights(w).items():
        torch.testing.assert_close(t, saved[n], atol=0, rtol=0)
    assert w.train_sft(seqs, num_global_tokens=sum(map(len, seqs.response_token_ids)))["lr"] == pytest.approx(1e-3)

    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        w.load_checkpoint(str(tmp_path / "half"))


def test_export_hf_round_trips_with_identical_logits(tiny_lm: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = make_worker(tiny_lm)
    batch = random_batch(seed=4)
    w.train_sft(batch, num_global_tokens=sum(map(len, batch.response_token_ids)))
    w.export_hf(str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").decode([5]) == AutoTokenizer.from_pretrained(tiny_lm).decode([5])
    ids = torch.tensor([batch.prompt_token_ids[1] + batch.response_token_ids[1]], device=w.device)
    w.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.to(w.device)(input_ids=ids).logits, w.model(input_ids=ids).logits,
                                   atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_zero3_matches_zero2_and_exports_gathered_weights(worker: LearnerWorker, tiny_lm: str,
                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    w3 = make_worker(tiny_lm, zero_stage=3)
    assert not w3._hidden_path  # the LM head is partitioned: logits path
    batch = random_batch(seed=6)
    for a, b in zip(worker.compute_logprobs(batch), w3.compute_logprobs(batch), strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    w3.train_sft(batch, num_global_tokens=sum(map(len, batch.response_token_ids)))
    synced = weights(w3)  # gathered per bucket from the partitions
    assert all(t.numel() > 0 for t in synced.values())
    w3.export_hf(str(tmp_path / "hf3"))
    loaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "hf3").named_parameters())
    for n, t in synced.items():
        torch.testing.assert_close(loaded[n], t.cpu(), atol=0, rtol=0)
    assert max((synced[n] - t).abs().max().item() for n, t in weights(worker).items()) > 1e-4


def test_oom_is_reraised_with_what_to_change(worker: LearnerWorker) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    worker._forward = out_of_memory  # instance attribute shadows the method for this worker only
    try:
        with pytest.raises(torch.OutOfMemoryError, match="(?i)lower learner.micro_batch_tokens.*gradient_checkpointing"):
            worker.compute_logprobs(random_batch())
    finally:
        del worker._forward


def test_lr_schedule_arithmetic() -> None:
    s = LRSchedule(lr=1.0, total_steps=10, warmup_steps=2, kind="cosine")
    # warm-up 1/2, 2/2; then cosine over the 8 remaining steps: step 6 is half-way -> 0.5
    assert [s.lr_at(0), s.lr_at(1), s.lr_at(2), s.lr_at(6), s.lr_at(10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert LRSchedule(lr=2.0, total_steps=5).lr_at(4) == 2.0


# ---------------------------------------------------------------------- VLM


def test_vlm_logprobs_and_policy_step(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from cascade_rl.data.tiny_models import build_tiny_vlm, load_vlm_processor

    path = str(build_tiny_vlm())
    proc = load_vlm_processor(path)
    prompts, images, pixels = [], [], []
    for i, (color, question) in enumerate([((255, 0, 0), "what color?"), ((0, 0, 255), "name the shape")]):
        Image.new("RGB", (40 + 8 * i, 32), color).save(tmp_path / f"{i}.png")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = proc(text=[text], images=[Image.open(tmp_path / f"{i}.png")], return_tensors="pt")
        prompts.append(inputs["input_ids"][0].tolist())  # image placeholder expanded to image_seq_length tokens
        images.append([str(tmp_path / f"{i}.png")])
        pixels.append(inputs["pixel_values"])
    prompts.append(proc.tokenizer("no image here")["input_ids"])
    images.append([])
    responses = [proc.tokenizer(t)["input_ids"] for t in ("red", "a circle", "ok then")]
    batch = SequenceBatch(prompts, responses, advantages=[1.0, -0.5, 0.25], images=images)

    w = make_worker(path, is_vlm=True, max_tiles=0)  # 0: the processor's own setting, as the prompts above
    got = w.compute_logprobs(batch)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        for k, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            kw = {"pixel_values": pixels[k]} if k < 2 else {}
            torch.testing.assert_close(torch.tensor(got[k]), hf_response_logprobs(model, p, r, **kw), atol=1e-5, rtol=0)
    w._packed = True  # all three packed in one row (pixel values concatenated in packed order)
    packed = w.compute_logprobs(batch)
    w.spec.micro_batch_tokens, w._packed = 32, False  # one sequence per micro-batch
    for a, b, c in zip(got, packed, w.compute_logprobs(batch), strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a), torch.tensor(c), atol=1e-5, rtol=0)

    before = weights(w)
    assert any(n.startswith("language_model.model.") for n in before)  # checkpoint names, not module names
    with_old_logprobs(batch, got)
    m = w.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2, num_global_seqs=3,
                       num_global_tokens=sum(map(len, responses)))
    assert torch.isfinite(torch.tensor(m["loss"]))
    after = weights(w)
    vision = [n for n in after if n.startswith("vision_tower.")]
    assert max((after[n] - before[n]).abs().max().item() for n in vision) > 0  # images reached the gradient

    short = list(prompts[0])
    short.remove(w.model.config.image_token_id)  # one image-context token fewer than the image needs
    bad = SequenceBatch([short], [responses[0]], images=[images[0]])
    with pytest.raises(ValueError, match="processor-expanded"):
        w.compute_logprobs(bad)


# ---------------------------------------------------------------------- 2 ranks == 1 rank


def _steps(w: LearnerWorker, batch: SequenceBatch, pairs: PairBatch, total: tuple[int, int, int]) -> dict:
    """GRPO step, GSPO step, MPO step on this rank's shard; ``total`` = global (sequences, tokens, pairs)."""
    out = {}
    for loss in ("grpo", "gspo"):
        with_old_logprobs(batch, w.compute_logprobs(batch))
        m = w.train_policy(batch, loss=loss, clip_low=0.2, clip_high=0.28, num_global_seqs=total[0],
                           num_global_tokens=total[1])
        out[loss], out[f"{loss}_grad_norm"] = m["loss"], m["grad_norm"]
    out["weights"] = weights(w)
    # δ moves once per micro-batch, so the MPO loss equals across layouts only when each rank (and the single
    # rank) holds its pairs in one micro-batch (50+14, 44+14 tokens); the final δ is the mean of all rewards
    # either way
    w.spec.micro_batch_tokens = 128
    chosen, rejected = w.compute_pair_logps(pairs)
    pairs.ref_chosen_logps = [c - 0.5 for c in chosen]
    pairs.ref_rejected_logps = [r + 0.5 for r in rejected]
    out["mpo"] = w.train_mpo(pairs, terms=MPO_TERMS, beta=0.1, num_global_pairs=total[2])["loss"]
    out["delta"] = w.reward_shift.state_dict()
    return out


def _shards() -> tuple[SequenceBatch, PairBatch, tuple[int, int, int]]:
    batch = random_batch(seed=5, prompt_lens=(12, 3, 11, 4, 9, 2), response_lens=(14, 3, 12, 5, 10, 1))
    pairs = PairBatch(batch.prompt_token_ids[:4], batch.response_token_ids[:4], batch.response_token_ids[2:6])
    total = (len(batch), sum(map(len, batch.response_token_ids)), len(pairs))
    return batch, pairs, total


# packed at a 40-token budget rank 0's sequences (26, 23, 19+3 tokens) need 3 micro-batches and rank 1's (6, 9)
# only 2: rank 1 runs one zero-weight dummy pass, which must change nothing. The single rank uses padded rows.
SHARDS = {0: [0, 2, 4, 5], 1: [1, 3]}
PAIR_SHARDS = {0: [0, 1], 1: [2, 3]}


def _run_rank(rank: int, path: str, port: int, out_dir: str) -> None:
    from cascade_rl.actors.learner_batches import sequence_units

    torch.set_num_threads(1)
    batch, pairs, total = _shards()
    w = make_worker(path, rank=rank, world_size=2, port=port, micro_batch_tokens=40, packing="packed")
    shard = batch.select(SHARDS[rank])
    dummies = [mb.is_dummy for mb in w._micro_batches(sequence_units(shard), images=None)]  # collective
    shard_pairs = PairBatch(*[[getattr(pairs, f)[i] for i in PAIR_SHARDS[rank]] for f in
                              ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")])
    out = _steps(w, shard, shard_pairs, total)
    torch.save({**out, "dummies": dummies}, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_equal_one_rank(tiny_lm: str, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_run_rank, args=(tiny_lm, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    batch, pairs, total = _shards()
    assert r0["dummies"] == [False] * 3 and r1["dummies"] == [False, False, True]
    one = _steps(make_worker(tiny_lm, micro_batch_tokens=40), batch, pairs, total)
    for key in ("grpo", "gspo", "mpo"):  # losses are already global (reduced over ranks)
        assert r0[key] == pytest.approx(one[key], abs=1e-6) and r1[key] == pytest.approx(one[key], abs=1e-6)
    for key in ("grpo_grad_norm", "gspo_grad_norm"):  # the global gradient, after DeepSpeed's reduction
        assert r0[key] == pytest.approx(one[key], rel=1e-5)
    assert r0["delta"] == r1["delta"]
    assert r0["delta"]["mean"] == pytest.approx(one["delta"]["mean"], abs=1e-7)
    assert not r1["weights"]  # only rank 0 returns synced weights
    for n, t in one["weights"].items():
        torch.testing.assert_close(r0["weights"][n], t, atol=1e-4, rtol=0)  # 10% of lr, as above
