"""RolloutWorker without Ray: prompt rendering, error messages, result assembly, the HF backend (LM and VLM).

vLLM itself is exercised through the session's one engine in ``test_groups.py`` / ``test_weight_sync.py`` (the
machine allows one engine at a time); here only its refusal of a VLM it cannot load, which happens before any
engine starts.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cascade_rl.actors.rollout import (
    GenerateResult,
    RolloutEngineError,
    RolloutWorker,
    explain_engine_error,
    render_prompts,
    sampled_logprobs,
    with_image_parts,
)
from PIL import Image

from cascade_rl.types import Generation

N = 4


# ------------------------------------------------------------------------------------------------ pure helpers


def test_with_image_parts_inserts_parts_before_the_user_text() -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "what shape?"}]
    out = with_image_parts(msgs, 2)
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what shape?"}]
    assert msgs[1]["content"] == "what shape?"  # input untouched
    ready = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    assert with_image_parts(ready, 1) is ready
    with pytest.raises(ValueError, match="1 image part"):
        with_image_parts(ready, 2)


def test_explain_engine_error_names_the_keys_to_change(make_rollout_spec: Any) -> None:
    spec = make_rollout_spec("/m", kv_cache_gib=1, max_prompt_tokens=100, max_response_tokens=28)
    kv = ValueError("To serve at least one request with max_model_len (128), 2 GiB KV cache is needed, which is "
                    "larger than the available KV cache memory (1 GiB).")
    cpu = explain_engine_error(kv, spec, on_gpu=False)
    assert isinstance(cpu, RolloutEngineError)
    assert "rollout.kv_cache_gib (now 1 GiB" in str(cpu) and "model.max_response_tokens" in str(cpu)
    assert "max_model_len = 128" in str(cpu)
    gpu = explain_engine_error(torch.OutOfMemoryError("CUDA out of memory"), spec, on_gpu=True)
    assert "rollout.gpu_memory_utilization (now 0.5)" in str(gpu)
    assert explain_engine_error(ValueError("unknown architecture"), spec, on_gpu=False) is None


def test_sampled_logprobs_reads_flat_and_per_position_containers() -> None:
    from vllm.logprobs import FlatLogprobs, Logprob

    ids = [7, 3, 9]
    per_position = [{7: Logprob(-0.5, 1)}, {3: Logprob(-1.25, 2)}, {9: Logprob(-2.0, 5)}]
    flat = FlatLogprobs()
    flat.extend(per_position)
    assert sampled_logprobs(flat, ids) == [-0.5, -1.25, -2.0]
    assert sampled_logprobs(per_position, ids) == [-0.5, -1.25, -2.0]
    with pytest.raises(KeyError):  # a container that is not about these tokens is not read blindly
        sampled_logprobs(flat, [7, 3, 4])


def test_generate_result_concat_offsets_prompt_indices() -> None:
    def part(num_prompts: int, version: int) -> GenerateResult:
        gens = [Generation(prompt_index=i, sample_index=j, text="", token_ids=[1, 2], logprobs=[-1.0, -1.0],
                           finish_reason="length", num_prompt_tokens=3) for i in range(num_prompts) for j in range(2)]
        return GenerateResult(gens, num_output_tokens=4 * num_prompts, generate_s=1.0, num_prompt_tokens=3,
                              policy_version=version, num_prompts=num_prompts)

    out = GenerateResult.concat([part(2, 1), part(0, 1), part(3, 1)], generate_s=2.0)
    # prompts 0-1 from worker 0, none from worker 1, 2-4 from worker 2; 2 samples each
    assert [(g.prompt_index, g.sample_index) for g in out.generations] == [(i, j) for i in range(5) for j in range(2)]
    assert out.num_prompts == 5 and out.num_output_tokens == 20 and out.generate_s == 2.0 and out.policy_version == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_engine_kwargs_are_vllm_engine_args_on_gpu_and_cpu(make_rollout_spec: Any) -> None:
    """Every key handed to ``vllm.LLM`` is an ``EngineArgs`` field, on both sides (a renamed one used to reach
    vLLM only on the GPU and fail there: ``sleep_when_idle_mode``)."""
    import dataclasses

    from cascade_rl.actors.rollout import engine_kwargs
    from vllm import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    spec = make_rollout_spec("/m", is_vlm=True, sleep_when_idle=True, gpu_memory_utilization=0.3)
    gpu = engine_kwargs(spec, True, {"max_patches": 4})
    assert set(gpu) <= fields and set(engine_kwargs(spec, False, None)) <= fields
    assert gpu["enable_sleep_mode"] is True and gpu["gpu_memory_utilization"] == 0.3
    assert gpu["max_model_len"] == spec.max_prompt_tokens + spec.max_response_tokens
    assert gpu["mm_processor_kwargs"] == {"max_patches": 4}
    assert "compilation_config" not in gpu  # rollout.compile=true (default): vLLM's own compilation settings
    uncompiled = engine_kwargs(make_rollout_spec("/m", enforce_eager=False, compile=False), True, None)
    assert uncompiled["compilation_config"] == {"mode": "NONE", "cudagraph_mode": "FULL_DECODE_ONLY"}
    from vllm.config import CompilationConfig

    parsed = CompilationConfig(**uncompiled["compilation_config"])  # vLLM accepts these names
    assert (parsed.mode.name, parsed.cudagraph_mode.name) == ("NONE", "FULL_DECODE_ONLY")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_tensor_parallel_engine_kwargs(make_rollout_spec: Any) -> None:
    """rollout.tensor_parallel_size reaches vLLM; with TP > 1 the engine runs its processes inside this actor
    ("mp": vLLM would pick "ray" inside a placement group and ask for GPUs the actor already holds)."""
    import dataclasses

    from cascade_rl.actors.rollout import engine_kwargs
    from vllm import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    one = engine_kwargs(make_rollout_spec("/m"), True, None)
    assert one["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in one
    for on_gpu in (True, False):
        two = engine_kwargs(make_rollout_spec("/m", tensor_parallel_size=2), on_gpu, None)
        assert set(two) <= fields
        assert two["tensor_parallel_size"] == 2 and two["distributed_executor_backend"] == "mp"


def test_cpu_thread_binding_gives_each_tensor_parallel_process_its_own_cores() -> None:
    from cascade_rl.actors.rollout import RolloutEngineError, cpu_thread_binding

    assert cpu_thread_binding([1, 0], 2) == "0|1"  # 2 cores / 2 processes = 1 core each
    assert cpu_thread_binding(list(range(8)), 2) == "0,1,2,3|4,5,6,7"  # 8 / 2 = 4 each
    assert cpu_thread_binding(list(range(5)), 2) == "0,1|2,3,4"  # 5 // 2: 2 then 3
    with pytest.raises(RolloutEngineError, match="rollout.tensor_parallel_size=4 on CPU"):
        cpu_thread_binding([0, 1], 4)


def test_a_weight_update_drops_vllms_prefix_and_image_feature_caches(make_rollout_spec: Any) -> None:
    """After any sync path the engine must not reuse what it computed with the old weights: the prefix KV cache
    always, and for a VLM the encoder cache of image features (vLLM's own reload_weights resets both)."""
    from types import SimpleNamespace

    from cascade_rl.actors.rollout import VLLMBackend

    calls: list[str] = []
    engine = SimpleNamespace(reset_encoder_cache=lambda: calls.append("encoder"))
    llm = SimpleNamespace(reset_prefix_cache=lambda: calls.append("prefix"), llm_engine=engine,
                          collective_rpc=lambda name, args=(): calls.append(name))
    backend = object.__new__(VLLMBackend)
    backend.llm = llm  # type: ignore[assignment]
    for is_vlm, want in ((True, ["prefix", "encoder"]), (False, ["prefix"])):
        backend.spec = make_rollout_spec("/m", is_vlm=is_vlm)
        for sync in (lambda: backend.load_persistent(None), backend.end_shared_load, backend.receive_weights,
                     lambda: backend.load_weights([])):
            calls.clear()
            sync()
            assert calls[1:] == want, calls  # calls[0]: the collective_rpc of the load itself


def test_hf_backend_parks_its_model_only_when_the_recipe_asks(make_rollout_spec: Any, monkeypatch) -> None:
    """The HF backend used to move its model to the CPU at every sleep, with rollout.sleep_when_idle off too:
    two full model copies per step in a learner-only stage. Now it sleeps as the vLLM backend does."""
    from types import SimpleNamespace

    from cascade_rl.actors.rollout_hf import HFBackend

    moves: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    backend = object.__new__(HFBackend)
    backend.device, backend.asleep = torch.device("cuda"), False
    backend.model = SimpleNamespace(to=lambda where: moves.append(str(where)))  # type: ignore[assignment]
    backend.spec = make_rollout_spec("/m", backend="hf", sleep_when_idle=False)
    backend.sleep()
    backend.wake_up()
    assert moves == []
    backend.spec = make_rollout_spec("/m", backend="hf", sleep_when_idle=True)
    backend.sleep()
    backend.wake_up()
    backend.wake_up()  # awake already: no second move
    assert moves == ["cpu", "cuda"]


def test_unknown_backend_is_refused(make_rollout_spec: Any) -> None:
    # the spec is built from the recipe, whose loader refuses the value and names the key
    with pytest.raises(ValueError, match="rollout.backend.*'sglang'"):
        RolloutWorker(make_rollout_spec("/m", backend="sglang"))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="vLLM could load the VLM here")
def test_vllm_backend_refuses_a_vlm_it_cannot_load(make_rollout_spec: Any, tiny_vlm: Path) -> None:
    with pytest.raises(RolloutEngineError, match="rollout.backend=hf"):
        RolloutWorker(make_rollout_spec(tiny_vlm, backend="vllm", is_vlm=True))


# ------------------------------------------------------------------------------------------------ HF backend (LM)


@pytest.fixture(scope="module")
def hf_worker(make_rollout_spec: Any, tiny_lm: Path) -> RolloutWorker:
    return RolloutWorker(make_rollout_spec(tiny_lm, backend="hf"))


def test_render_prompts_tokenises_with_the_chat_template(hf_worker: RolloutWorker, prompts: list) -> None:
    tok, renderer = hf_worker.engine.tokenizer, hf_worker.engine.renderer
    rendered = render_prompts(prompts[:2], renderer, max_prompt_tokens=128)
    text = "<|im_start|>user\nWhat is 0 + 1?<|im_end|>\n<|im_start|>assistant\n"
    assert rendered[0].text == text
    assert rendered[0].token_ids == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"2 prompt\(s\) exceed model.max_prompt_tokens=5: #0"):
        render_prompts(prompts[:2], renderer, max_prompt_tokens=5)
    with pytest.raises(ValueError, match="text-only"):
        render_prompts([(prompts[0][0], ["/x.png"])], renderer, max_prompt_tokens=128)


def test_hf_generate_returns_n_ordered_samples_with_logprobs(hf_worker: RolloutWorker, prompts: list) -> None:
    out = hf_worker.generate(prompts, N)
    gens = out.generations
    assert len(gens) == len(prompts) * N and out.num_prompts == len(prompts)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, j) for i in range(len(prompts)) for j in range(N)]
    eos = set(hf_worker.engine.eos_ids)
    for g in gens:
        assert len(g.logprobs) == len(g.token_ids) >= 1
        assert all(lp <= 0 and math.isfinite(lp) for lp in g.logprobs)
        assert g.num_prompt_tokens == len(g.prompt_token_ids) > 0 and g.policy_version == 0
        if g.finish_reason == "stop":
            assert g.token_ids[-1] in eos and not eos & set(g.token_ids[:-1])
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == hf_worker.spec.max_response_tokens
    assert out.num_output_tokens == sum(len(g.token_ids) for g in gens)
    # samples of one prompt differ (sampling, temperature 1); a prompt's rendering is shared by its samples
    assert len({tuple(g.token_ids) for g in gens[:N]}) > 1
    assert len({tuple(g.prompt_token_ids) for g in gens[:N]}) == 1
    # behaviour log-probs are the model's own log-probs of the sampled tokens (temperature 1)
    again = hf_worker.compute_logprobs([g.prompt_token_ids for g in gens[:3]], [g.token_ids for g in gens[:3]])
    for g, lp in zip(gens[:3], again, strict=True):
        assert max(abs(a - b) for a, b in zip(g.logprobs, lp, strict=True)) < 1e-5


def test_hf_seeds_reproduce_and_greedy_repeats(hf_worker: RolloutWorker, prompts: list) -> None:
    a = hf_worker.generate(prompts[:2], 2, seeds=[7, 8])
    b = hf_worker.generate(prompts[:2], 2, seeds=[7, 8])
    assert [g.token_ids for g in a.generations] == [g.token_ids for g in b.generations]
    greedy = hf_worker.generate(prompts[:2], 3, greedy=True).generations
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids


def test_hf_finish_reasons_stop_at_the_first_eos(hf_worker: RolloutWorker) -> None:
    engine = hf_worker.engine
    eos, pad = engine.eos_ids[0], engine.pad_id
    assert engine._cut([11, 12, eos, pad, pad]) == [11, 12, eos]
    samples = engine._finish([5, 6, 7], [[11, eos], [11, 12, 13]], {})
    assert [s.finish_reason for s in samples] == ["stop", "length"]
    assert [len(s.logprobs) for s in samples] == [2, 3]


def test_hf_update_weights_changes_and_restores_logprobs(hf_worker: RolloutWorker, tiny_lm: Path) -> None:
    from safetensors.torch import load_file

    original = load_file(str(tiny_lm / "model.safetensors"))
    seq = ([3, 4, 5, 6], [7, 8, 9])
    before = hf_worker.compute_logprobs([seq[0]], [seq[1]])[0]
    torch.manual_seed(1)
    noisy = [(k, v + 0.1 * torch.randn_like(v)) for k, v in original.items()]
    assert hf_worker.update_weights(noisy, version=3) >= 0 and hf_worker.policy_version == 3
    moved = hf_worker.compute_logprobs([seq[0]], [seq[1]])[0]
    assert max(abs(a - b) for a, b in zip(before, moved, strict=True)) > 1e-2
    hf_worker.update_weights(list(original.items()), version=4)
    restored = hf_worker.compute_logprobs([seq[0]], [seq[1]])[0]
    assert max(abs(a - b) for a, b in zip(before, restored, strict=True)) < 1e-6
    assert hf_worker.generate([([{"role": "user", "content": "hi"}], [])], 1).generations[0].policy_version == 4
    with pytest.raises(ValueError, match="not in the rollout model"):
        hf_worker.update_weights([("vision_tower.bogus.weight", torch.zeros(2))], version=5)


# ------------------------------------------------------------------------------------------------ HF backend (VLM)


def test_hf_backend_serves_the_tiny_vlm_with_images(make_rollout_spec: Any, tiny_vlm: Path,
                                                    tmp_path: Path) -> None:
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(red)
    Image.new("RGB", (48, 80), (20, 20, 220)).save(blue)
    worker = RolloutWorker(make_rollout_spec(tiny_vlm, backend="hf", is_vlm=True))
    image_id = worker.engine.model.config.image_token_id
    prompts = [([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
                [str(red)]),
               ([{"role": "user", "content": "How many sides has a square?"}], []),
               ([{"role": "user", "content": "Which colour is this?"}], [str(blue)])]  # image part added
    out = worker.generate(prompts, 2)
    assert [(g.prompt_index, g.sample_index) for g in out.generations] == [(i, j) for i in range(3) for j in range(2)]
    for g in out.generations:
        assert len(g.logprobs) == len(g.token_ids) >= 1 and all(lp <= 0 for lp in g.logprobs)
        assert image_id not in g.token_ids  # image placeholders are never sampled
    image_seq = worker.engine.model.config.image_seq_length
    first = {g.prompt_index: g for g in out.generations if g.sample_index == 0}
    for k in (0, 2):  # expanded once per tile of InternVL's dynamic tiling, the tile count logged with it
        assert len(first[k].image_tiles) == 1 and first[k].image_tiles[0] >= 1
        assert first[k].prompt_token_ids.count(image_id) == image_seq * first[k].image_tiles[0]
    assert first[0].image_sha256 != first[2].image_sha256  # two different files, two content hashes
    assert image_id not in first[1].prompt_token_ids  # the text-only prompt
    with pytest.raises(FileNotFoundError, match="missing.png"):
        worker.generate([([{"role": "user", "content": "x"}], [str(tmp_path / "missing.png")])], 1)


def test_engine_process_picks_inline_or_a_child_process(make_rollout_spec: Any) -> None:
    from cascade_rl.actors.rollout import engine_inline

    assert [engine_inline(make_rollout_spec("m", engine_process=e), on_gpu=g) for e in ("auto", "inline", "separate")
            for g in (False, True)] == [True, False, True, True, False, False]
    with pytest.raises(Exception, match=r"recipe key `rollout.engine_process`: .*Invalid value 'thread'"):
        make_rollout_spec("m", engine_process="thread")
