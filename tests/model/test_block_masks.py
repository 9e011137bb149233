"""FlexAttention block masks from cu_seqlens against create_block_mask and the eager reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from flexbert import FlexBertModel, ModelConfig
from flexbert.attention.block_masks import BLOCK_SIZE, packed_block_mask, packed_block_structure
from flexbert.layout import Layout, positions_from_cu_seqlens
from tests.conftest import ragged_batch

LENGTHS = {
    "ragged": [300, 5, 129, 400, 1],
    "whole-blocks": [128, 128, 256, 3],
    "one-long": [1000],
    "many-short": [7] * 50,
    "empty-sequence": [200, 0, 150],
}


def _layout(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    return Layout(
        False, positions_from_cu_seqlens(cu, total), cu_seqlens=cu, max_seqlen=max(lengths)
    )


def _dense(num: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        out[row, indices[0, 0, row, : num[0, 0, row]].long()] = True
    return out


@pytest.mark.parametrize("half", [None, 4, 64, 129, 255])  # 129, 255: block-gap edges
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_block_structure_equals_create_block_mask(lengths, half):
    layout = _layout(lengths)
    seq, pos = layout.seq_ids(), layout.pos_in_seq()
    total = seq.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = seq[q_idx] == seq[kv_idx]
        if half is not None:
            keep = keep & ((pos[q_idx] - pos[kv_idx]).abs() <= half)
        return keep

    ref = create_block_mask(mask_mod, None, None, total, total, device="cpu")
    n = -(-total // BLOCK_SIZE)
    partial, full = packed_block_structure(seq, half)
    assert torch.equal(partial, _dense(ref.kv_num_blocks, ref.kv_indices, n))
    assert torch.equal(full, _dense(ref.full_kv_num_blocks, ref.full_kv_indices, n))
    assert n == 1 or not partial.all()  # guards the test: there is sparsity to get wrong
    mask = packed_block_mask(layout, half)
    assert mask.shape[-2:] == (total, total)
    assert torch.equal(mask.to_dense(), ref.to_dense())


@pytest.mark.parametrize(
    "pattern",
    [{"name": "global"}, {"name": "local_global", "window": 16, "global_every": 2}],
    ids=["global", "local"],
)
def test_flex_on_many_blocks_matches_eager(pattern):
    lengths = [300, 5, 129, 256]
    ids, mask = ragged_batch(lengths)
    ref = FlexBertModel(ModelConfig.preset("tiny", backend="eager", attention_pattern=pattern))
    flex = FlexBertModel(ModelConfig.preset("tiny", backend="flex", attention_pattern=pattern))
    flex.load_state_dict(ref.state_dict())
    with torch.no_grad():
        expected = ref.eval()(ids, attention_mask=mask).last_hidden_state[mask]
        got = flex.eval()(ids, attention_mask=mask).last_hidden_state[mask]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
