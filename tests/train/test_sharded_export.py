"""Export after FSDP training: every rank gathers the sharded weights into one ordinary model
of the trained class on rank 0 (`runtime.full_model`), which the Hugging Face export saves as
it would an unsharded model; summaries count parameters without gathering
(`runtime.parameter_count`). Composer's FSDP needs CUDA; torch's FSDP1 and FSDP2 shard on the
CPU too (gloo), so both are tested here on two processes."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fsdp1", "fsdp2"])
def test_every_shard_is_gathered_into_one_model_on_rank_0(two_ranks, case):
    from tests.train.two_rank_worker import sharded_models

    rank0, rank1 = two_ranks(case)
    assert rank1 is None
    for name, expected in sharded_models().items():
        got = rank0[name]
        assert got["class"] == type(expected).__name__  # not FSDP's wrapper or subclass
        assert got["kwargs"] == expected.init_kwargs() and not got["sharded"]
        assert got["parameters"] == expected.num_params()  # counted without gathering
        state = expected.state_dict()
        assert got["state"].keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got["state"][key], value), (name, key)
            else:  # ColBERT's settings (`_extra_state`)
                assert got["state"][key] == value


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fsdp1", "fsdp2"])
def test_a_gathered_model_exports_like_the_unsharded_one(two_ranks, case):
    """Rank 0's Hugging Face export of the gathered model loads back to the weights and
    outputs the model had before it was sharded."""
    from flexbert import FlexBertForMaskedLM
    from tests.train.two_rank_worker import sharded_models

    expected = sharded_models()["mlm"].eval()
    loaded = FlexBertForMaskedLM.from_hf(two_ranks(case)[0]["mlm"]["hf"]).eval()
    ids = torch.randint(
        5, expected.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits)
