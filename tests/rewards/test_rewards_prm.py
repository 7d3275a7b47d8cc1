"""PRM: step splitting, marker insertion, scores == softmax of the model's own logits, aggregation, loading."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from cascade_rl.rewards import RewardScorer, best_of_n
from cascade_rl.rewards.prm import aggregate_scores, load_prm, prm_reward, split_steps

from cascade_rl.types import RewardTermConfig, Sample

PROMPT = [{"role": "user", "content": "What is 12+7?"}]
RESPONSES = ["12+7=19\n\nThe answer is 19.", "12+7=20\nso 20", "19"]


def _samples() -> list[Sample]:
    return [Sample(prompt=PROMPT, response=r, ground_truth="19") for r in RESPONSES]


def test_split_steps() -> None:
    assert split_steps("a\n\nb\nc\n\n\n d ") == ["a", "b", "c", "d"]  # blank lines or newlines, stripped
    assert split_steps("Step 1: x. Step 2: y.", r"(?=Step \d)") == ["Step 1: x.", "Step 2: y."]
    assert split_steps("") == [] and split_steps("\n \n") == []
    assert split_steps("1\n2\n3\n4", max_steps=2) == ["1", "2\n3\n4"]  # the tail is merged, never dropped


def test_aggregates() -> None:
    p = [0.9, 0.5, 0.8]
    assert aggregate_scores(p, "min") == 0.5 and aggregate_scores(p, "last") == 0.8
    assert aggregate_scores(p, "mean") == pytest.approx((0.9 + 0.5 + 0.8) / 3)
    assert aggregate_scores(p, "product") == pytest.approx(0.9 * 0.5 * 0.8)
    assert aggregate_scores([], "min") is None
    with pytest.raises(ValueError, match="kwargs.aggregate"):
        aggregate_scores(p, "max")


def _reference_scores(path: Path, ids: list[int], positions: list[int], pos_id: int, neg_id: int,
                      vision: bool) -> tuple[list[float], list[float]]:
    """P(+) at the marker positions from an independent, unbatched forward: (pair softmax, vocab softmax)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    pair, vocab = [], []
    for t in positions:
        zp, zn = logits[t, pos_id].item(), logits[t, neg_id].item()
        pair.append(math.exp(zp) / (math.exp(zp) + math.exp(zn)))  # softmax over {+, -}
        vocab.append(math.exp(zp - torch.logsumexp(logits[t], 0).item()))  # softmax over the vocabulary
    return pair, vocab


@pytest.mark.parametrize("which", ["lm", "vlm"])
def test_scores_are_softmax_at_marker_positions(which: str, tiny_lm: Path, tiny_vlm: Path) -> None:
    path = tiny_lm if which == "lm" else tiny_vlm
    prm = load_prm(str(path))
    tok = prm.tokenizer
    pos_id, neg_id = (tok("+", add_special_tokens=False)["input_ids"][0], tok("-", add_special_tokens=False)["input_ids"][0])
    samples = _samples()
    batched = prm.step_scores(samples, batch_size=8)  # padded batch of 3 different lengths
    vocab_batched = prm.step_scores(samples, normalize="vocab")
    marker_ids = tok("<prm>", add_special_tokens=False)["input_ids"]
    for sample, got, got_vocab in zip(samples, batched, vocab_batched, strict=True):
        steps = split_steps(sample.response)
        ids, positions, _ = prm.build_inputs(sample, steps, "<prm>")
        prefix = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
        assert tok.decode(ids) == prefix + "\n".join(s + "<prm>" for s in steps)  # a marker after every step
        assert len(positions) == len(steps)
        for t in positions:  # the score is read at the marker's last token
            assert ids[t - len(marker_ids) + 1: t + 1] == marker_ids
        pair, vocab = _reference_scores(path, ids, positions, pos_id, neg_id, which == "vlm")
        assert got == pytest.approx(pair, abs=1e-5)
        assert got_vocab == pytest.approx(vocab, abs=1e-6)
        assert prm_reward([sample], model_path=str(path), aggregate="min") == [pytest.approx(min(pair), abs=1e-5)]
        assert prm_reward([sample], model_path=str(path), aggregate="product") == [
            pytest.approx(math.prod(pair), abs=1e-5)]


def test_loads_a_saved_checkpoint_folder_and_refuses_non_local(tiny_lm: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my_prm"
    shutil.copytree(tiny_lm, folder)
    out = prm_reward(_samples(), model_path=str(folder), aggregate="last")
    assert len(out) == 3 and all(0.0 < v < 1.0 for v in out)
    assert prm_reward([Sample(prompt=PROMPT, response="  ")], model_path=str(folder))[0].reason.startswith("empty")
    with pytest.raises(ValueError, match="not a local Hugging Face folder"):
        prm_reward(_samples(), model_path="OpenGVLab/VisualPRM-8B")
    with pytest.raises(ValueError, match="kwargs.positive"):
        prm_reward(_samples(), model_path=str(folder), positive="yes indeed")


def test_prm_in_a_worker_process_and_best_of_n(tiny_lm: Path) -> None:
    kwargs = {"model_path": str(tiny_lm), "aggregate": "mean"}
    with RewardScorer([RewardTermConfig("prm", 1.0, kwargs)], timeout_s=30, num_workers=1) as scorer:
        results = scorer.score(_samples())
    expected = prm_reward(_samples(), **kwargs)
    assert [r.components["prm"] for r in results] == pytest.approx(expected, abs=1e-6)
    groups = [_samples(), _samples()[:2]]
    chosen = best_of_n(groups, lambda s: prm_reward(s, **kwargs))
    assert chosen == [max(range(3), key=lambda j: expected[j]), max(range(2), key=lambda j: expected[j])]
    assert best_of_n([[Sample(prompt=[], response="a")] * 2], lambda s: [None, 0.1]) == [1]


def test_vlm_scores_steps_with_the_image(tiny_vlm: Path, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "red.png")
    sample = Sample(prompt=[{"role": "user", "content": "What colour is it?"}], response="It is red.\nred",
                    images=[str(tmp_path / "red.png")])
    prm = load_prm(str(tiny_vlm))
    (got,) = prm.step_scores([sample])
    ids, positions, pixel_values = prm.build_inputs(sample, ["It is red.", "red"], "<prm>")
    assert pixel_values is not None and prm.tokenizer.decode(ids).count("<IMG_CONTEXT>") == 4  # expanded image
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    pos_id, neg_id = (prm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in "+-")
    with torch.no_grad():
        z = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0, positions]  # (K, V)
    assert got == pytest.approx(torch.sigmoid(z[:, pos_id] - z[:, neg_id]).tolist(), abs=1e-5)


def test_image_and_text_samples_score_alike_in_one_batch_or_alone(tiny_vlm: Path, tmp_path: Path) -> None:
    """Batched scoring (tiles of several images concatenated in row order, text-only rows beside them) gives
    each sample the scores it gets alone."""
    from PIL import Image

    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "a.png")
    Image.effect_noise((160, 64), 80).convert("RGB").save(tmp_path / "wide.png")
    q = [{"role": "user", "content": "Which shape?"}]
    samples = [Sample(prompt=q, response="a circle\nso circle", images=[str(tmp_path / "wide.png")]),
               Sample(prompt=q, response="12+7=19\n\n19"),
               Sample(prompt=q, response="a square", images=[str(tmp_path / "a.png"), str(tmp_path / "wide.png")])]
    prm = load_prm(str(tiny_vlm), max_tiles=4)
    batched = prm.step_scores(samples, batch_size=8)
    alone = [prm.step_scores([s], batch_size=1)[0] for s in samples]
    assert [len(s) for s in batched] == [2, 2, 1]
    for b, a in zip(batched, alone, strict=True):
        assert b == pytest.approx(a, abs=1e-5)
    assert prm.renderer.render(q, samples[0].images).num_tiles == [4]  # the policy's tiling (max_tiles=4)
