"""Preference pairs for MPO from rollout logs: correctness pairs, PRM-margin pairs and DropoutNTP pairs.

Correctness pairing follows MMPR (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal LLMs via
Mixed Preference Optimization", §3.1; InternVL ``mmpr_data_pipeline_correctness_postprocess.py``):

- Records are grouped by ``prompt_id``. Positives are records with ``correct is True``; every other record of a
  prompt that has a ground truth is a negative: ``correct is False``, and ``correct is None`` — an answer the
  verifier could not parse, or a check that errored or timed out (``error`` set). Unparseable = wrong, as in MMPR.
- Only prompts with both a positive and a negative yield pairs (else dropped as ``all_correct`` / ``all_wrong``).
- Entailment rule (``substring``): a pair is skipped when the chosen response's extracted answer is a substring
  (case-insensitive) of the rejected response's extracted answer, as MMPR compares ``answer_pred`` strings.
  Deviation: when both answers parse as numbers they are compared as numbers, so a wrong ``11`` is not skipped
  for a correct ``1``. A chosen answer that cannot be extracted falls back to the ground truth; a rejected answer
  that cannot be extracted never triggers the rule.
- Identical pairs (same prompt, images, chosen and rejected text) and chosen == rejected text are dropped
  (``duplicate``) before the cap, so the cap picks distinct pairs (MMPR dedupes after sampling).
- At most ``max_pairs_per_prompt`` pairs per prompt (MMPR: 15), sampled with
  ``random.Random(derive_seed(seed, "pairs", prompt_id))``, so the result does not depend on the order of prompts or of the log's shards.

PRM-margin pairing (``method="prm_margin"``, or ``"auto"`` for prompts without a ground truth): the record with
the highest ``prm`` reward component vs the one with the lowest, when the margin is >= ``min_prm_margin``.

DropoutNTP (MMPR §3.1, for prompts without a checkable answer): ``build_dropout_ntp_requests`` keeps the first
half of a good response; the caller lets the policy continue it *without the image*; ``finish_dropout_ntp`` makes
pairs with chosen = the original response, rejected = prefix + continuation.

Pair ids are a hash of the method and source record ids, so rebuilding the pairs of one log gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..seeding import derive_seed
from ..types import Generation, PreferencePair, RolloutRecord
from .rollout_log import write_table_atomic

METHODS = ("correctness", "prm_margin", "auto")
# Prompt-level reasons count prompts; pair-level reasons (substring, duplicate, capped) count candidate pairs.
DROP_REASONS = ("all_correct", "all_wrong", "no_answer", "no_prm", "small_margin", "substring", "duplicate", "capped")
IMAGE_PART_TYPES = {"image", "image_url", "image_pil", "video"}
PAIR_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("images", pa.list_(pa.string())),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("chosen_token_ids", pa.list_(pa.int32())),
    pa.field("rejected_token_ids", pa.list_(pa.int32())),
    pa.field("method", pa.string()),
    pa.field("source_ids", pa.list_(pa.string())),
    pa.field("ref_chosen_logp", pa.float64()),
    pa.field("ref_rejected_logp", pa.float64()),
])
assert [f.name for f in fields(PreferencePair)] == PAIR_SCHEMA.names, "PAIR_SCHEMA must follow PreferencePair"

_ANSWER_RE = re.compile(r"(?i)\b(?:final answer|answer)\s*(?::|：|\bis\b)\s*([^\n]+)")


@dataclass
class PairStats:
    """What ``build_pairs`` did. ``dropped`` maps a reason (``DROP_REASONS``) to a count of prompts or pairs."""

    num_records: int = 0
    num_prompts: int = 0
    num_prompts_with_pairs: int = 0
    num_pairs: int = 0
    num_unparseable_negatives: int = 0  # negatives with correct=None (unparsed answer or failed check)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    pairs_by_method: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """Flat numbers: ``num_*``, ``dropped_<reason>``, ``pairs_<method>``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("num_")}
        out.update({f"dropped_{k}": v for k, v in self.dropped.items()})
        out.update({f"pairs_{k}": v for k, v in sorted(self.pairs_by_method.items())})
        return out


# ---------------------------------------------------------------------------------------------------- answers


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` in ``text`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last ``\\boxed{…}``, else the rest of the last ``Answer: …`` line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_RE.findall(text)
    if matches:
        return matches[-1].strip().rstrip(".").strip() or None
    return None


def _as_number(s: str) -> float | None:
    try:
        x = float(s.replace(",", ""))
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def answer_entails(chosen_answer: str | None, rejected_answer: str | None) -> bool:
    """MMPR's entailment test: the chosen answer occurs inside the rejected one (numbers compare as numbers)."""
    if not chosen_answer or rejected_answer is None:
        return False
    a, b = chosen_answer.strip().strip("$").lower(), rejected_answer.strip().strip("$").lower()
    na, nb = _as_number(a), _as_number(b)
    if na is not None and nb is not None:
        return na == nb
    return bool(a) and a in b


# ---------------------------------------------------------------------------------------------------- pairing


def _pair_id(method: str, source_ids: list[str], extra: str = "") -> str:
    return hashlib.sha256("\x1f".join([method, *source_ids, extra]).encode()).hexdigest()[:24]


def _make_pair(chosen: RolloutRecord, rejected: RolloutRecord, method: str) -> PreferencePair:
    source_ids = [chosen.record_id, rejected.record_id]
    return PreferencePair(
        pair_id=_pair_id(method, source_ids), prompt_id=chosen.prompt_id, prompt=chosen.prompt,
        images=list(chosen.images), chosen=chosen.response, rejected=rejected.response,
        prompt_token_ids=list(chosen.prompt_token_ids), chosen_token_ids=list(chosen.response_token_ids),
        rejected_token_ids=list(rejected.response_token_ids), method=method, source_ids=source_ids)


def _group(records: Sequence[RolloutRecord]) -> dict[str, list[RolloutRecord]]:
    """Records by prompt id, prompts and records sorted by id (independent of log order)."""
    groups: dict[str, list[RolloutRecord]] = defaultdict(list)
    for r in records:
        groups[r.prompt_id].append(r)
    for pid, group in groups.items():
        truths = {r.ground_truth for r in group}
        if len(truths) > 1:
            raise ValueError(f"prompt_id {pid!r} has records with different ground truths {sorted(map(str, truths))}; "
                             f"a prompt id must name one question — fix the ids in the log (logs import --id-key)")
        group.sort(key=lambda r: r.record_id)
    return dict(sorted(groups.items()))


def _prm_score(record: RolloutRecord, component: str) -> float | None:
    try:
        comps = json.loads(record.rewards) if record.rewards else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"record {record.record_id!r}: `rewards` is not JSON ({exc}); it must hold "
                         f"{{component: score}}") from exc
    value = comps.get(component) if isinstance(comps, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _route(method: str, group: list[RolloutRecord], prm_component: str) -> str:
    """Which pairing a prompt gets, or the drop reason when none applies."""
    # a ground truth, or correctness labels (an imported log of labelled responses) make correctness pairs
    has_answer = group[0].ground_truth is not None or any(r.correct is not None for r in group)
    if method == "correctness" or (method == "auto" and has_answer):
        return "correctness" if has_answer else "no_answer"
    has_prm = any(_prm_score(r, prm_component) is not None for r in group)
    if method == "prm_margin":
        return "prm_margin" if has_prm else "no_prm"
    return "prm_margin" if has_prm else "no_answer"


def _correctness_candidates(group: list[RolloutRecord], stats: PairStats,
                            extractor: Callable[[str], str | None]) -> list[tuple[RolloutRecord, RolloutRecord]]:
    positives = [r for r in group if r.correct is True]
    negatives = [r for r in group if r.correct is not True]
    stats.num_unparseable_negatives += sum(r.correct is None for r in negatives)
    if not negatives or not positives:
        stats.dropped["all_correct" if not negatives else "all_wrong"] += 1
        return []
    rejected_answers = {r.record_id: extractor(r.response) for r in negatives}
    out = []
    for c in positives:
        chosen_answer = extractor(c.response) or c.ground_truth  # a correct response's answer is the truth
        for r in negatives:
            if answer_entails(chosen_answer, rejected_answers[r.record_id]):
                stats.dropped["substring"] += 1
            else:
                out.append((c, r))
    return out


def _prm_candidates(group: list[RolloutRecord], stats: PairStats, component: str,
                    min_margin: float) -> list[tuple[RolloutRecord, RolloutRecord]]:
    scored = sorted(((s, r) for r in group if (s := _prm_score(r, component)) is not None),
                    key=lambda x: (-x[0], x[1].record_id))
    if len(scored) < 2:
        stats.dropped["no_prm"] += 1
        return []
    (best, chosen), (worst, rejected) = scored[0], scored[-1]
    if best - worst < min_margin:
        stats.dropped["small_margin"] += 1
        return []
    return [(chosen, rejected)]


def _dedupe_and_cap(cands: list[tuple[RolloutRecord, RolloutRecord]], seen: set[tuple], prompt_id: str,
                    max_pairs: int, seed: int, stats: PairStats) -> list[tuple[RolloutRecord, RolloutRecord]]:
    unique, keys = [], set()
    for c, r in cands:
        key = (c.prompt, tuple(c.images), c.response, r.response)
        if c.response == r.response or key in seen or key in keys:
            stats.dropped["duplicate"] += 1
            continue
        keys.add(key)
        unique.append((c, r))
    if len(unique) > max_pairs:
        stats.dropped["capped"] += len(unique) - max_pairs
        keep = sorted(random.Random(derive_seed(seed, "pairs", prompt_id)).sample(range(len(unique)), max_pairs))
        unique = [unique[i] for i in keep]
    seen.update((c.prompt, tuple(c.images), c.response, r.response) for c, r in unique)
    return unique


def build_pairs(records: Sequence[RolloutRecord], *, max_pairs_per_prompt: int = 15, seed: int = 0,
                method: str = "correctness", prm_component: str = "prm", min_prm_margin: float = 0.1,
                answer_extractor: Callable[[str], str | None] = extract_answer,
                ) -> tuple[list[PreferencePair], PairStats]:
    """Preference pairs from logged responses (see the module docstring for the rules) and what was dropped.

    ``method``: ``correctness`` (MMPR), ``prm_margin`` (highest vs lowest ``prm_component`` score of a prompt,
    kept when the margin >= ``min_prm_margin``), or ``auto`` (correctness where the prompt has a ground truth,
    else PRM margin where PRM scores exist).
    """
    if method not in METHODS:
        raise ValueError(f"pairing method {method!r} is unknown; valid: {', '.join(METHODS)}")
    if max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt={max_pairs_per_prompt}: must be >= 1 (mpo.max_pairs_per_prompt)")
    if min_prm_margin < 0:
        raise ValueError(f"min_prm_margin={min_prm_margin}: must be >= 0")
    stats = PairStats(num_records=len(records))
    pairs: list[PreferencePair] = []
    seen: set[tuple] = set()
    for prompt_id, group in _group(records).items():
        stats.num_prompts += 1
        route = _route(method, group, prm_component)
        if route == "correctness":
            cands = _correctness_candidates(group, stats, answer_extractor)
        elif route == "prm_margin":
            cands = _prm_candidates(group, stats, prm_component, min_prm_margin)
        else:
            stats.dropped[route] += 1
            continue
        kept = _dedupe_and_cap(cands, seen, prompt_id, max_pairs_per_prompt, seed, stats)
        pairs.extend(_make_pair(c, r, route) for c, r in kept)
        stats.num_prompts_with_pairs += bool(kept)
        stats.pairs_by_method[route] = stats.pairs_by_method.get(route, 0) + len(kept)
    stats.num_pairs = len(pairs)
    return pairs, stats


def no_pairs_hint(stats: PairStats, source: str) -> str:
    """Why ``build_pairs`` made no pairs from ``source`` and what to change, from its drop counts."""
    d = stats.dropped
    if stats.num_records == 0:
        return f"{source} holds no records; run a rollout stage first or point mpo.logs at a filled log"
    if d["no_answer"] == stats.num_prompts:
        return (f"none of the {stats.num_prompts} prompts in {source} has a ground truth or correctness labels, so "
                "no response can be called right or wrong. For ready-made (chosen, rejected) pairs set "
                "stages.N.mpo.pairs to the pairs file instead; for labelled responses import them with "
                "`cascade-rl logs import --correct-key …`; or add a ground truth (--answer-key)")
    if d["no_prm"] + d["small_margin"] == stats.num_prompts:
        return f"no prompt in {source} has PRM scores with a margin of at least min_prm_margin"
    return (f"pairs need prompts with both right and wrong responses ({d['all_correct']} prompts all right, "
            f"{d['all_wrong']} all wrong, {d['substring']} pairs dropped by the substring rule): raise "
            "rollout.group_size or rollout.temperature, or train the start policy longer (sft stage)")


# ---------------------------------------------------------------------------------------------------- DropoutNTP


@dataclass
class DropoutNTPRequest:
    """Continue ``prefix`` after ``messages`` (the prompt without its images) to make a rejected response."""

    request_id: str
    prompt_id: str
    source: RolloutRecord  # the good response: chosen, and the source of the prefix
    messages: list[dict[str, Any]]  # prompt messages with image parts removed
    prefix: str  # first half of the response text
    prefix_token_ids: list[int]  # first half of the response tokens ([] when truncated by words)


def strip_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with image/video parts and ``<image>`` placeholders removed."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [p for p in content if not (isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)]
        elif isinstance(content, str):
            content = content.replace("<image>\n", "").replace("<image>", "")
        out.append({**m, "content": content})
    return out


def _good_response(group: list[RolloutRecord]) -> RolloutRecord | None:
    """The highest-reward record that finished normally without errors (ties: smallest record id)."""
    ok = [r for r in group if r.error is None and r.finish_reason != "length" and r.response.strip()]
    return min(ok, key=lambda r: (-r.reward, r.record_id)) if ok else None


def _truncate(record: RolloutRecord, ratio: float,
              decode: Callable[[list[int]], str] | None) -> tuple[str, list[int]] | None:
    ids = list(record.response_token_ids)
    if decode is not None and ids:
        n = int(len(ids) * ratio)
        return (decode(ids[:n]), ids[:n]) if 0 < n < len(ids) else None
    words = record.response.split(" ")  # MMPR truncates by words when no tokenizer is at hand
    n = int(len(words) * ratio)
    return (" ".join(words[:n]).strip(), []) if 0 < n < len(words) else None


def build_dropout_ntp_requests(records: Sequence[RolloutRecord], *, ratio: float = 0.5,
                               decode: Callable[[list[int]], str] | None = None) -> list[DropoutNTPRequest]:
    """One request per prompt without a ground truth: the first ``ratio`` of its best response.

    With ``decode`` (token ids -> text) the cut is by response tokens and ``prefix_token_ids`` is set; without it
    the cut is by words (MMPR) and the caller tokenises. Prompts whose best response is too short to cut are
    skipped.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio={ratio}: the kept fraction of the response must lie in (0, 1); MMPR uses 0.5")
    requests = []
    for prompt_id, group in _group(records).items():
        if group[0].ground_truth is not None:
            continue
        source = _good_response(group)
        cut = _truncate(source, ratio, decode) if source is not None else None
        if cut is None:
            continue
        requests.append(DropoutNTPRequest(
            request_id=f"{source.record_id}#dropout_ntp", prompt_id=prompt_id, source=source,
            messages=strip_images(source.messages), prefix=cut[0], prefix_token_ids=cut[1]))
    return requests


def finish_dropout_ntp(requests: Sequence[DropoutNTPRequest],
                       continuations: Sequence[str | Generation]) -> list[PreferencePair]:
    """Pairs from continued prefixes: chosen = original response, rejected = prefix + continuation.

    ``continuations[i]`` continues ``requests[i]``: a string, or a ``Generation`` (then the rejected token ids are
    prefix ids + its token ids; otherwise they are left empty for the caller to tokenise). A continuation that
    reproduces the original response exactly gives no pair.
    """
    if len(requests) != len(continuations):
        raise ValueError(f"finish_dropout_ntp got {len(continuations)} continuations for {len(requests)} requests; "
                         f"pass exactly one continuation per request, in request order")
    pairs = []
    for req, cont in zip(requests, continuations, strict=True):
        text = cont.text if isinstance(cont, Generation) else cont
        src = req.source
        rejected = req.prefix + text
        if rejected == src.response:
            continue
        has_ids = isinstance(cont, Generation) and (req.prefix_token_ids or not req.prefix)
        pairs.append(PreferencePair(
            pair_id=_pair_id("dropout_ntp", [src.record_id], rejected), prompt_id=req.prompt_id,
            prompt=src.prompt, images=list(src.images), chosen=src.response, rejected=rejected,
            prompt_token_ids=list(src.prompt_token_ids), chosen_token_ids=list(src.response_token_ids),
            rejected_token_ids=req.prefix_token_ids + list(cont.token_ids) if has_ids else [],
            method="dropout_ntp", source_ids=[src.record_id]))
    return pairs


# ---------------------------------------------------------------------------------------------------- files


def fill_token_ids(pairs: Sequence[PreferencePair], *,
                   encode_prompt: Callable[[list[dict[str, Any]], list[str]], list[int]],
                   encode_response: Callable[[str], list[int]]) -> int:
    """Tokenise the empty token-id fields of pairs in place (imported logs, pair files, word-cut DropoutNTP);
    ``encode_prompt(messages, image_paths)`` renders a VLM prompt with its images. Return how many."""
    filled = 0
    for p in pairs:
        if not p.prompt_token_ids:
            p.prompt_token_ids, filled = list(encode_prompt(json.loads(p.prompt), list(p.images or []))), filled + 1
        if not p.chosen_token_ids:
            p.chosen_token_ids, filled = list(encode_response(p.chosen)), filled + 1
        if not p.rejected_token_ids:
            p.rejected_token_ids, filled = list(encode_response(p.rejected)), filled + 1
    return filled


def write_pairs(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    """Write pairs to one parquet file atomically (temp file + fsync + rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_table_atomic(pa.Table.from_pylist([p.to_row() for p in pairs], schema=PAIR_SCHEMA), path)


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs written by ``write_pairs``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist; build it with `cascade-rl pairs LOGS -o {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"pairs file {path} is not readable parquet ({exc}); delete it and rebuild it with "
                         f"`cascade-rl pairs` (an mpo stage rebuilds it when it is missing)") from exc
    missing = [c for c in PAIR_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ValueError(f"pairs file {path} lacks columns {missing}; it was not written by write_pairs")
    return [PreferencePair(**row) for row in table.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA).to_pylist()]
