"""Resource limits: truncated responses are flagged, and memory failures say which recipe key to change.

The message builders are fed real exception texts: raised by vLLM's own checks where they can be called without an
engine, by the CPU allocator for a real failed allocation, and from a real killed actor; the remaining ones are
vLLM's format strings as the installed release writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cascade_rl.actors.faults import is_memory_text, learner_failure_message, learner_oom_message
from cascade_rl.actors.rollout import RolloutEngineError, RolloutSpec, explain_engine_error

from cascade_rl.stages.workers import spec_with

MAX_RESPONSE_TOKENS = 3


def _spec(model_path: str = "/models/policy", **overrides: Any) -> RolloutSpec:
    base: dict[str, Any] = dict(
        model_path=model_path, backend="hf", dtype="float32", max_response_tokens=MAX_RESPONSE_TOKENS,
        max_prompt_tokens=125, temperature=1.0, top_p=1.0, seed=0, gpu_memory_utilization=0.5, kv_cache_gib=1,
        enforce_eager=True)
    return spec_with(RolloutSpec, **{**base, **overrides})


# ------------------------------------------------------------------------------------------------ truncation


def test_responses_past_the_length_limit_are_truncated_and_flagged(tiny_lm: Path, tmp_path: Path) -> None:
    from cascade_rl.actors.rollout import RolloutWorker

    from cascade_rl.config import StageConfig
    from cascade_rl.data.prompts import PromptItem
    from cascade_rl.data.rollout_log import RolloutLogWriter, read_rollout_log, summarize_rollout_log
    from cascade_rl.stages.rollout import make_records
    from cascade_rl.stages.state import RunState
    from cascade_rl.types import RewardResult

    worker = RolloutWorker(_spec(str(tiny_lm)))
    eos = worker.engine.eos_ids
    items = [PromptItem(id=f"p{i}", messages=[{"role": "user", "content": f"What is {i} + {i}?"}], answer=str(2 * i))
             for i in range(6)]
    out = worker.generate(items, 4)
    gens = out.generations
    assert all(1 <= len(g.token_ids) <= MAX_RESPONSE_TOKENS for g in gens)  # cut at the limit
    for g in gens:  # "length" exactly when the cut came before an EOS
        hit_limit = len(g.token_ids) == MAX_RESPONSE_TOKENS and g.token_ids[-1] not in eos
        assert g.finish_reason == ("length" if hit_limit else "stop"), (g.token_ids, g.finish_reason)
    num_length = sum(g.finish_reason == "length" for g in gens)
    assert num_length >= 1  # a random tiny model rarely says EOS within 3 tokens

    # the flag reaches the rollout log (and the `rollout/finish_length` metric reads the same field)
    ctx = SimpleNamespace(run_state=RunState(mlflow_run_id="run"))
    results = [RewardResult(total=0.0, correct=False) for _ in gens]
    records = make_records(ctx, StageConfig(kind="rollout", name="rollout"), 0, items, out, results)
    RolloutLogWriter(tmp_path).append(records)
    logged = read_rollout_log(tmp_path)
    assert [(r.finish_reason, r.num_response_tokens) for r in logged] == \
        [(g.finish_reason, len(g.token_ids)) for g in gens]
    assert summarize_rollout_log(tmp_path)["finish_reasons"].get("length") == num_length


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.fixture(scope="module")
def vllm_errors(tiny_lm: Path) -> dict[str, BaseException]:
    """Real exceptions raised by the installed vLLM's own checks (no engine is started)."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    errors: dict[str, BaseException] = {}
    try:
        from vllm.v1.core.kv_cache_utils import _check_enough_kv_cache_memory
    except ImportError:  # a private helper: other releases may move it
        pass
    else:
        try:
            _check_enough_kv_cache_memory(1 << 30, lambda: 3 << 30, 4096, lambda available: 1500)
        except ValueError as exc:
            errors["kv_too_small"] = exc
    try:
        EngineArgs(model=str(tiny_lm), max_model_len=10**7).create_model_config()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors["context_too_long"] = exc
    return errors


def test_vllm_kv_cache_too_small_names_the_cache_and_length_keys(vllm_errors: dict[str, BaseException]) -> None:
    if "kv_too_small" not in vllm_errors:
        pytest.skip("this vLLM release has no _check_enough_kv_cache_memory")
    spec = _spec(max_prompt_tokens=4000, max_response_tokens=96, kv_cache_gib=1)
    cpu = explain_engine_error(vllm_errors["kv_too_small"], spec, on_gpu=False)
    assert isinstance(cpu, RolloutEngineError)
    msg = str(cpu)
    assert msg.startswith("vLLM ran out of memory for /models/policy: raise rollout.kv_cache_gib (now 1 GiB")
    assert "model.max_response_tokens / model.max_prompt_tokens (max_model_len = 4096)" in msg
    assert "estimated maximum model length is 1500" in msg  # vLLM's own estimate is quoted
    gpu = str(explain_engine_error(vllm_errors["kv_too_small"], spec, on_gpu=True))
    assert "raise rollout.gpu_memory_utilization (now 0.5)" in gpu and "rollout.sleep_when_idle" in gpu


def test_vllm_context_longer_than_the_model_names_the_length_keys(vllm_errors: dict[str, BaseException]) -> None:
    err = explain_engine_error(vllm_errors["context_too_long"], _spec(), on_gpu=False)
    assert isinstance(err, RolloutEngineError)
    assert "max_model_len is longer than the model's context" in str(err)
    assert "lower model.max_response_tokens / model.max_prompt_tokens (max_model_len = 128)" in str(err)
    assert "Engine said: Value error, User-specified max_model_len (10000000)" in str(err)  # the line that matters


@pytest.mark.parametrize("text,on_gpu,expect", [
    # vllm/v1/worker/cpu_worker.py: VLLM_CPU_KVCACHE_SPACE above the free host memory -> lower it, not raise it
    ("Available memory on node 0 (3.20/23.47 GiB) on kv cache allocation is less than requested memory for kv "
     "(64.00 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other "
     "processes.", False, "lower rollout.kv_cache_gib (now 1 GiB"),
    # vllm/v1/core/kv_cache_utils.py: nothing left for the cache after the weights
    ("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the "
     "engine.", True, "raise rollout.gpu_memory_utilization (now 0.5)"),
    # vllm/v1/engine/input_processor.py: an image prompt longer than max_model_len
    ("The decoder prompt (length 9000) is longer than the maximum model length of 128. Make sure that "
     "`max_model_len` is no smaller than the number of text tokens plus multimodal tokens.", False,
     "raise model.max_prompt_tokens, or shorten that prompt"),
    # torch's CUDA caching allocator, during generation on a shared GPU
    ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.23 GiB "
     "is free.", True, "lower rollout.gpu_memory_utilization or enable rollout.sleep_when_idle"),
])
def test_vllm_engine_texts_map_to_the_key_to_change(text: str, on_gpu: bool, expect: str) -> None:
    err = explain_engine_error(ValueError(text), _spec(), on_gpu=on_gpu)
    assert isinstance(err, RolloutEngineError) and expect in str(err), err
    assert text[:60] in str(err)  # the engine's words are kept


def test_other_engine_errors_are_left_alone() -> None:
    assert explain_engine_error(ValueError("Model architectures ['Foo'] are not supported"), _spec(), False) is None


# ------------------------------------------------------------------------------------------------ learner


def _real_cpu_oom() -> RuntimeError:
    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the CPU allocator refuses at once
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 1 PiB allocation succeeded")


def test_learner_oom_guard_rewrites_a_real_allocation_failure() -> None:
    from cascade_rl.actors.learner import LearnerSpec, LearnerWorker

    from cascade_rl.algos.packing import build_micro_batch

    real = _real_cpu_oom()
    assert not isinstance(real, torch.OutOfMemoryError) and is_memory_text(str(real))  # a plain RuntimeError
    # the guard only reads spec, rank and device from the worker
    rank = SimpleNamespace(spec=spec_with(LearnerSpec, "/m", micro_batch_tokens=8192, zero_stage=2), rank=1,
                           device=torch.device("cpu"))
    mb = build_micro_batch([([1, 2, 3], [4, 5]), ([1, 2], [6])], packed=False, pad_token_id=0)
    with pytest.raises(torch.OutOfMemoryError) as info:
        with LearnerWorker._oom_guard(rank, mb, "train_policy"):
            torch.empty(1 << 50, dtype=torch.uint8)
    msg = str(info.value)
    assert msg.startswith("learner rank 1 ran out of host memory in train_policy on a micro-batch of 8 tokens "
                          "(2 sequences)")
    assert "lower learner.micro_batch_tokens (now 8192" in msg and "learner.gradient_checkpointing=true" in msg
    assert "DefaultCPUAllocator" in msg  # the allocator's words are kept
    with pytest.raises(ValueError, match="not memory"):  # anything else passes through untouched
        with LearnerWorker._oom_guard(rank, mb, "train_policy"):
            raise ValueError("not memory")


def test_learner_gpu_oom_lists_the_fixes_in_order_of_cost() -> None:
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.11 GiB of which 3.12 GiB is free. Of the allocated memory 70.1 GiB is "
                                  "allocated by PyTorch, and 2.3 GiB is reserved by PyTorch but unallocated.")
    msg = learner_oom_message(rank=0, where="train_mpo", num_tokens=16384, num_seqs=12, on_gpu=True,
                              micro_batch_tokens=16384, gradient_checkpointing=False, zero_stage=2,
                              offload_optimizer=False, detail=str(cuda))
    order = ["learner.micro_batch_tokens (now 16384", "learner.gradient_checkpointing=true",
             "learner.zero_stage (now 2", "learner.offload_optimizer=true", "model.dtype=bfloat16"]
    positions = [msg.index(k) for k in order]
    assert positions == sorted(positions), msg
    assert "accelerator memory in train_mpo" in msg and "Tried to allocate 20.00 GiB" in msg
    done = learner_oom_message(rank=0, where="x", num_tokens=1, num_seqs=1, on_gpu=True, micro_batch_tokens=1,
                               gradient_checkpointing=True, zero_stage=3, offload_optimizer=True, detail="oom")
    assert "gradient_checkpointing" not in done and "zero_stage" not in done  # only what is left to change


def test_learner_death_message_adds_memory_advice_only_on_evidence(tmp_path: Path) -> None:
    killed = ("The actor died unexpectedly before finishing this task. The actor is dead because its worker process "
              "has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a "
              "connection error code 2. End of file. Some common causes include: (1) the process was killed by the "
              "OOM killer due to high memory usage, (2) ray stop --force was called")
    monitor = "1 worker(s) were killed due to the node running low on memory. Memory on the node was 22.9GB / 23.4GB"
    plain = learner_failure_message(dead_ranks=[1], num_ranks=2, call="train_policy", cause=RuntimeError(killed),
                                    last_checkpoint=str(tmp_path / "step-000005"), writing=None)
    assert "ran out of memory" not in plain  # Ray lists the OOM killer as a *possible* cause of every death
    assert f"The last complete checkpoint, {tmp_path / 'step-000005'}, is intact" in plain
    oom = learner_failure_message(dead_ranks=[0], num_ranks=1, call="train_sft", cause=RuntimeError(monitor),
                                  last_checkpoint=None, writing=str(tmp_path / "step-000010"))
    assert "ran out of memory: lower learner.micro_batch_tokens" in oom
    assert f"{tmp_path / 'step-000010'} has no COMPLETE marker and will never be used" in oom
    assert "No checkpoint was completed by this process yet" in oom and "resume=auto" in oom


def test_truncation_flag_survives_the_jsonl_import_path(tmp_path: Path) -> None:
    """Logs from elsewhere keep their finish reason, so truncated responses stay flagged in `logs stats`."""
    from cascade_rl.data.convert import convert_jsonl
    from cascade_rl.data.rollout_log import summarize_rollout_log

    rows = [{"prompt": "1+1?", "response": "2", "answer": "2", "correct": True, "finish_reason": "stop"},
            {"prompt": "1+2?", "response": "3 and then some more wor", "answer": "3", "correct": False,
             "finish_reason": "length"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert_jsonl(src, tmp_path / "log")
    assert summarize_rollout_log(tmp_path / "log")["finish_reasons"] == {"length": 1, "stop": 1}
