"""The one seed scheme: ``derive_seed(*parts)`` turns the recipe seed and the names / indices of what is being
seeded into a 63-bit seed.

``sha256(json([parts]))`` truncated to 63 bits: the same parts give the same seed in every process and Python run
(no hash randomisation), parts are unambiguous (``("a/b",)`` and ``("a", "b")`` differ), and the value fits every
consumer (``random.Random``, ``torch.manual_seed``, vLLM's int64 ``SamplingParams.seed``). Callers name their
purpose first after the recipe seed, e.g. ``derive_seed(seed, "rollout", call, prompt)``.
"""

from __future__ import annotations

import hashlib
import json


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63)`` determined by ``parts`` (ints and strings)."""
    if not parts:
        raise ValueError("derive_seed needs at least one part (the recipe seed)")
    for p in parts:
        if not isinstance(p, (int, str)) or isinstance(p, bool):
            raise TypeError(f"derive_seed parts are ints or strings, got {type(p).__name__} {p!r}")
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
