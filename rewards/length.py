"""``length_penalty``: DAPO's soft overlong penalty (Yu et al. 2025, "DAPO", eq. 13).

With ``L`` the response length, ``L_max = max_length`` and ``L_cache = cache_length``:

    R(L) = 0                                  if L <= L_max - L_cache
         = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max   (linear from 0 to -1)
         = -1                                 if L > L_max

``L`` is ``sample.metadata[length_key]`` (default ``num_response_tokens``, tokens) when present, else the
response's length in characters (set the limits in the matching unit). Use a positive weight: the term is <= 0.
"""

from __future__ import annotations

from cascade_rl.types import Sample

from .math_verify_reward import text_of
from .registry import register_reward


def overlong_penalty(length: float, max_length: float, cache_length: float) -> float:
    """DAPO's soft overlong penalty for one length (see the module docstring)."""
    soft = max_length - cache_length
    if length <= soft:
        return 0.0
    if length > max_length:
        return -1.0
    return (soft - length) / cache_length


@register_reward("length_penalty")
def length_penalty_reward(sample: Sample, *, max_length: int = 4096, cache_length: int = 512,
                          length_key: str = "num_response_tokens") -> float:
    """DAPO soft overlong penalty: 0 up to max_length - cache_length, linear to -1 at max_length."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"length_penalty: need 0 < kwargs.cache_length ({cache_length}) <= kwargs.max_length "
                         f"({max_length})")
    meta = sample.metadata or {}
    if length_key in meta and meta[length_key] is not None:
        length = float(meta[length_key])
    else:
        length = float(len(text_of(sample.response) or ""))
    return overlong_penalty(length, float(max_length), float(cache_length))
