"""Tokenizer, tiny Qwen3 LM and tiny InternVL VLM: they load with transformers / vLLM, generate, and are cached."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cascade_rl.data import tiny_models
from cascade_rl.data.tasks import draw_shapes, make_arithmetic, shapes_scene
from cascade_rl.data.tiny_models import build_tiny_lm, load_vlm_processor, resolve_model_path
from cascade_rl.data.tokenizer import EOS_TOKEN, IMAGE_TOKENS, PAD_TOKEN, SPECIAL_TOKENS, train_tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"


def test_tokenizer_round_trip_and_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    corpus = [f"{r['prompt']}\n{r['solution']}" for r in make_arithmetic(300, 0)]
    tok = AutoTokenizer.from_pretrained(train_tokenizer(tmp_path / "tok", corpus, vocab_size=400))
    assert len(tok) <= 400
    for text in ["7+4=11. The answer is \\boxed{11}.", "héllo wörld ∑ 😀", QUESTION]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # digits are one token each: "12345" -> 5 tokens
    assert tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"]) == list("12345")
    for t in SPECIAL_TOKENS:  # each special token is one id and is never split
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert (tok.eos_token, tok.pad_token) == (EOS_TOKEN, PAD_TOKEN) == ("<|im_end|>", "<|endoftext|>")
    assert tok.context_image_token == IMAGE_TOKENS["context_image_token"] == "<IMG_CONTEXT>"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    image_msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert tok.apply_chat_template(image_msg, tokenize=False) == "<|im_start|>user\n<IMG_CONTEXT>\nHow many?<|im_end|>\n"


def test_tiny_lm_loads_and_generates(tiny_lm: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    cfg = model.config
    assert (cfg.model_type, cfg.head_dim, cfg.vocab_size) == ("qwen3", 64, len(tok))
    assert json.loads((tiny_lm / "generation_config.json").read_text())["eos_token_id"] == [
        tok.eos_token_id, tok.pad_token_id]
    enc = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 4)
    # the LM loss is finite and gradients flow (the learner trains this model)
    loss = model(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_tiny_vlm_forward_and_generate(tiny_vlm: Path) -> None:
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_vlm).eval()
    proc = load_vlm_processor(tiny_vlm)
    scenes = [shapes_scene(random.Random(i)) for i in range(2)]
    images = [draw_shapes(s["shapes"]) for s in scenes]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scenes[0]["prompt"]}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text, text], images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)  # one 64x64 tile per image
    num_image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert num_image_tokens.tolist() == [model.config.image_seq_length] * 2 == [4, 4]
    with torch.no_grad():
        logits = model(**inputs).logits  # (B, T, V)
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert not torch.allclose(logits[0, -1], logits[1, -1])  # same text, different images: the image is seen
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_build_is_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_RL_CACHE", str(tmp_path))
    calls = []
    real = tiny_models._train_tokenizer
    monkeypatch.setattr(tiny_models, "_train_tokenizer", lambda *a: calls.append(a) or real(*a))
    small = {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "intermediate_size": 128}
    first = build_tiny_lm(**small)
    stamp_mtime = (first / tiny_models.STAMP).stat().st_mtime_ns
    assert first.parent == tmp_path / "models" and (first / "model.safetensors").is_file()
    assert build_tiny_lm(**small) == first and len(calls) == 1  # reused, not rebuilt
    assert (first / tiny_models.STAMP).stat().st_mtime_ns == stamp_mtime
    other = build_tiny_lm(**{**small, "seed": 1})
    assert other != first and len(calls) == 2
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp")] == []
    assert resolve_model_path("tiny:lm?hidden_size=64&num_layers=1&num_heads=1&intermediate_size=128") == first
    with pytest.raises(FileExistsError, match="other arguments"):
        build_tiny_lm(first, **{**small, "seed": 2})


def test_resolve_model_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model.path='tiny:xl'.*tiny:lm, tiny:vlm"):
        resolve_model_path("tiny:xl")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) hidden.*valid: hidden_size"):
        resolve_model_path("tiny:lm?hidden=3")
    with pytest.raises(FileNotFoundError, match=r"model.path='Qwen/Qwen3-0.6B': no such folder.*Set model.path"):
        resolve_model_path("Qwen/Qwen3-0.6B")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_resolve_model_path_passes_folders_through(tiny_lm: Path) -> None:
    assert resolve_model_path("tiny:lm") == tiny_lm
    assert resolve_model_path(str(tiny_lm)) == tiny_lm.resolve()


@pytest.mark.slow
def test_vllm_generates_with_the_tiny_lm(tiny_lm_vllm, tiny_lm: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=1.0, seed=0, logprobs=0)
    out = tiny_lm_vllm.generate([{"prompt_token_ids": prompt_ids}], params)[0].outputs[0]
    assert len(out.token_ids) == 6
    # vLLM's log-probs of its sampled tokens match transformers' on the same weights
    vllm_logprobs = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids, strict=True)])
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    ids = torch.tensor([prompt_ids + list(out.token_ids)])
    with torch.no_grad():
        logp = model(ids).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)  # (6, V)
    hf_logprobs = logp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(vllm_logprobs, hf_logprobs, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_internvl3_5_2b_shape_is_the_hf_internvl_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench shape, built with 1 text and 1 vision layer (the full 2B is 4 GB); its full size on the meta device."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from cascade_rl.data import tiny_models

    full = tiny_models.VLM_SHAPES["internvl3_5-2b"]
    monkeypatch.setitem(tiny_models.VLM_SHAPES, "one-layer", {**full, "num_layers": 1, "vision_layers": 1})
    path = tiny_models.build_tiny_vlm(tmp_path / "m", shape="one-layer")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "internvl" and config.architectures == ["InternVLForConditionalGeneration"]
    assert config.image_seq_length == 256  # (448 / 14 / 2)^2 tokens per tile
    assert (config.text_config.hidden_size, config.text_config.vocab_size) == (2048, 151_936)
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (1024, [448, 448])
    processor = json.loads((path / "preprocessor_config.json").read_text())
    assert processor["crop_to_patches"] and processor["max_patches"] == 12
    config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers = 28, 24
    config.text_config.layer_types = ["full_attention"] * 28
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert 1.9e9 < sum(p.numel() for p in model.parameters()) < 2.4e9  # InternVL3.5-2B: about 2.1B
    with pytest.raises(ValueError, match="valid shapes are tiny, internvl3_5-2b"):
        tiny_models.build_tiny_vlm(shape="internvl9")
