"""Sequence packing by token budget, unpacking to the original order, right padding."""

import pytest
import torch

from cascade_rl.algos.packing import (
    pack_sequences,
    pack_values,
    pad_sequences,
    plan_micro_batches,
    unpack,
    unpack_to_original,
)


def test_plan_hand_example():
    # lengths (5, 3, 3, 2, 1), budget 6. First-fit-decreasing needs 3 bins: {5,1} {3,3} {2}.
    # Worst-fit-decreasing over 3 open bins: 5->b0, 3->b1, 3->b2, 2->b1 (tie 3/3 -> lowest index), 1->b2 (load 3 < 5)
    # -> b0 = {0}: 5 tokens, b1 = {1, 3}: 5 tokens, b2 = {2, 4}: 4 tokens
    assert plan_micro_batches([5, 3, 3, 2, 1], 6) == [[0], [1, 3], [2, 4]]


def test_min_num_micro_batches_gives_non_empty_balanced_batches():
    # 8 sequences of 2 tokens fit one batch of 16, but 4 are asked for -> 4 batches of 2 sequences
    plan = plan_micro_batches([2] * 8, 16, min_num_micro_batches=4)
    assert [len(b) for b in plan] == [2, 2, 2, 2]
    assert sorted(i for b in plan for i in b) == list(range(8))


def test_pack_layout():
    seqs = [torch.tensor([1, 2, 3]), [4, 5], torch.tensor([6])]
    (batch,) = pack_sequences(seqs, max_tokens=10)
    # sorted longest first: 0 (3 tokens), 1 (2), 2 (1) -> all in one micro-batch, original order kept
    assert batch.indices == [0, 1, 2]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 3 and batch.num_tokens == 6 and batch.num_seqs == 3


def test_roundtrip_to_original_order():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 9, 3, 3, 8, 2]
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in lengths]
    batches = pack_sequences(seqs, max_tokens=12)
    assert all(b.num_tokens <= 12 for b in batches)
    # a per-token "model output" (here the ids as float, shape (1, total)) split back per sequence
    per_batch = [unpack(b.input_ids.float(), b.cu_seqlens) for b in batches]
    restored = unpack_to_original(per_batch, batches)
    for original, back in zip(seqs, restored, strict=True):
        assert torch.equal(original.float(), back)
    # extra per-token tensors (old log-probs, advantages) follow the same plan
    old = [torch.full((n,), float(i)) for i, n in enumerate(lengths)]
    packed_old = pack_values(old, batches[0].indices)
    assert packed_old.shape == (1, batches[0].num_tokens)


def test_too_long_sequence_raises_with_advice():
    with pytest.raises(ValueError, match="exceeds the micro-batch token budget max_tokens=4"):
        plan_micro_batches([3, 5], 4)


def test_pad_sequences_right_pads_with_mask():
    padded, mask = pad_sequences([[1, 2, 3], [4]], padding_value=0)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    floats, _ = pad_sequences(
        [torch.tensor([0.5]), torch.tensor([1.5, 2.5])], padding_value=-1.0, max_length=4
    )
    assert floats.dtype == torch.float32 and floats.tolist() == [
        [0.5, -1.0, -1.0, -1.0],
        [1.5, 2.5, -1.0, -1.0],
    ]
