"""Micro-batch planning by token budget and the packed / padded layouts the learner runs."""

import pytest
import torch

from cascade_rl.algos.packing import build_micro_batch, pad_rows, plan_micro_batches, plan_units


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


def test_packed_layout_positions_and_targets():
    # sequences (prompt, response): ([1, 2], [3, 4]) and ([5], [6]) -> one row 1 2 3 4 5 6
    mb = build_micro_batch([([1, 2], [3, 4]), ([5], [6])], packed=True, pad_token_id=0, units=[7, 9])
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]] and mb.attention_mask is None
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    # seq 0 at offset 0, prompt 2: its response tokens are predicted at 0+2-1 = 1, 2; seq 1 at offset 4: 4+1-1 = 4
    assert mb.target_positions.tolist() == [1, 2, 4] and mb.targets.tolist() == [3, 4, 6]
    assert (mb.response_lengths, mb.units, mb.num_tokens, mb.num_seqs) == ([2, 1], [7, 9], 6, 2)


def test_padded_layout_positions_and_targets():
    mb = build_micro_batch([([1, 2], [3, 4]), ([5], [6])], packed=False, pad_token_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # row 1 starts at flat offset 4 (width 4): its response token is predicted at 4 + 1 - 1 = 4
    assert mb.target_positions.tolist() == [1, 2, 4] and mb.targets.tolist() == [3, 4, 6]
    assert mb.num_tokens == 6  # real tokens only


def test_both_layouts_select_the_same_tokens():
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(1, 50, (p,), generator=g).tolist(), torch.randint(1, 50, (r,), generator=g).tolist())
            for p, r in [(3, 2), (1, 5), (4, 1)]]
    for packed in (True, False):
        mb = build_micro_batch(seqs, packed=packed, pad_token_id=0)
        flat = mb.input_ids.reshape(-1)
        # the token after each target position is the target itself (next-token prediction)
        assert torch.equal(flat[mb.target_positions + 1], mb.targets)


def test_plan_units_counts_padding_and_keeps_pairs_together():
    # padded: units of lengths [4] [4] [2]; budget 8 -> rows x widest: {0, 1} = 2 x 4 = 8, then {2}
    assert plan_units([[4], [4], [2]], 8, packed=False) == [[0, 1], [2]]
    # packed: a pair (3 + 3 tokens) is one unit of 6 tokens
    assert plan_units([[3, 3], [2], [4]], 6, packed=True) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="learner.micro_batch_tokens=5"):
        plan_units([[3, 3]], 5, packed=True)


def test_too_long_sequence_raises_with_advice():
    with pytest.raises(ValueError, match="exceeds the micro-batch token budget max_tokens=4"):
        plan_micro_batches([3, 5], 4)


def test_pad_rows_right_pads_with_mask():
    values, mask = pad_rows([torch.tensor([0.5]), torch.tensor([1.5, 2.5])], value=-1.0)
    assert values.tolist() == [[0.5, -1.0], [1.5, 2.5]] and mask.tolist() == [[True, False], [True, True]]
    empty, empty_mask = pad_rows([torch.zeros(0)])
    assert empty.shape == empty_mask.shape == (1, 1)  # losses always see a 2-D shape
