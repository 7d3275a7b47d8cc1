"""Ray actors of cascade_rl, as plain classes: rollout (vLLM / transformers), reward, learner, weight sync.

``group.py`` applies ``ray.remote`` and owns placement; stages talk only to the groups (``docs/actors_api.md``).
Heavy dependencies (vllm, deepspeed, ray in workers) are imported where used, so importing this package is cheap.
"""

from .rollout import GenerateResult, PromptInput, RolloutEngineError, RolloutSpec, RolloutWorker

__all__ = ["GenerateResult", "PromptInput", "RolloutEngineError", "RolloutSpec", "RolloutWorker"]
