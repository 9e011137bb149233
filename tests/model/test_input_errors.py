"""Bad input to the model core fails with a message that names the problem and what is valid,
instead of a wrong result or a bare traceback. Value checks run only where reading the
values costs no host sync (CPU tensors, outside torch.compile)."""

from __future__ import annotations

import pytest
import torch

from flexbert import ConfigError, FlexBertForMaskedLM, FlexBertModel, ModelConfig
from flexbert.bench.host_syncs import HostSyncRecorder
from flexbert.layout import check_cu_seqlens
from flexbert.model import check_token_ids
from tests.conftest import ragged_batch


@pytest.fixture(scope="module")
def model():
    return FlexBertForMaskedLM(ModelConfig.preset("tiny")).eval()


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_attention_mask_of_another_shape_than_input_ids_is_refused(padding):
    model = FlexBertModel(ModelConfig.preset("tiny", padding=padding))
    ids = torch.randint(4, 512, (2, 16))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids "):
        model(ids, attention_mask=torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize(
    "cu",
    [[0, 16, 40], [0, 20, 16, 26], [2, 16, 26], [0, 16, 20]],
    ids=["past the end", "decreasing", "not from 0", "short of the end"],
)
def test_cu_seqlens_that_do_not_describe_the_tokens_are_refused(model, cu):
    ids = torch.randint(4, 512, (26,))
    expected = (
        "cu_seqlens must start at 0, never decrease, and end at the number of tokens "
        f"(26); got {cu}"
    )
    with pytest.raises(ValueError) as err:
        model(input_ids=ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert str(err.value) == expected


@pytest.mark.parametrize(
    ("cu", "needle"),
    [
        (torch.tensor([[0, 26]]), r"cu_seqlens must be 1-D \(num_seqs \+ 1,\).*got shape \(1, 2\)"),
        (torch.tensor([0]), r"cu_seqlens must be 1-D .*got shape \(1,\)"),
        (torch.tensor([0.0, 26.0]), r"cu_seqlens must be an integer tensor, got torch.float32"),
    ],
)
def test_cu_seqlens_of_the_wrong_shape_or_dtype_are_refused(model, cu, needle):
    with pytest.raises(ValueError, match=needle):
        model(input_ids=torch.randint(4, 512, (26,)), cu_seqlens=cu)


def test_a_max_seqlen_shorter_than_a_packed_sequence_is_refused(model):
    cu = torch.tensor([0, 16, 26], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen=10 is shorter than .* \(16 tokens\)"):
        model(input_ids=torch.randint(4, 512, (26,)), cu_seqlens=cu, max_seqlen=10)


def test_long_cu_seqlens_are_shortened_in_the_message():
    cu = torch.arange(0, 101, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"got \[0, 1, 2, 3, 4, 5, \.\.\., 100\] \(101 entries\)"):
        check_cu_seqlens(cu, 99, None)


def test_a_mask_and_cu_seqlens_together_are_refused(model):
    cu = torch.tensor([0, 26], dtype=torch.int32)
    ids = torch.randint(4, 512, (26,))
    with pytest.raises(ValueError, match="either attention_mask .* or cu_seqlens"):
        model(input_ids=ids, cu_seqlens=cu, attention_mask=torch.ones(26, dtype=torch.bool))


@pytest.mark.parametrize("bad", [512, 9999, -1])
@pytest.mark.parametrize("packed", [False, True])
def test_token_ids_outside_the_vocabulary_are_refused(model, bad, packed):
    ids, mask = ragged_batch([12, 7])
    ids[0, 3] = bad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if packed:
        cu = torch.tensor([0, 12, 19], dtype=torch.int32)
        inputs = {"input_ids": ids[mask], "cu_seqlens": cu}
    low, high = min(bad, int(ids[mask].min())), max(bad, int(ids[mask].max()))
    expected = f"input_ids must be token ids in [0, vocab_size=512); got ids from {low} to {high}"
    with pytest.raises(ValueError) as err:
        model(**inputs)
    assert str(err.value) == expected


def test_padding_slots_are_not_embedded_when_unpadded_so_they_are_not_checked(model):
    ids, mask = ragged_batch([12, 7])
    ids[1, 10] = -100  # a padding slot: removed before the embedding
    model(ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_input_ids_other_than_int64_or_int32_are_refused(model, dtype):
    with pytest.raises(ValueError, match=f"int64 or int32 token ids, got {dtype}"):
        model(torch.ones(2, 8, dtype=dtype))


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_labels_of_another_shape_than_input_ids_are_refused_in_both_layouts(padding):
    """A label tensor shifted by one column used to be gathered onto the wrong tokens in the
    unpadded layout (the padded one failed); both now name the expected shape."""
    from flexbert import FlexBertForTokenClassification

    cfg = ModelConfig.preset("tiny", padding=padding)
    ids, mask = torch.randint(5, 100, (2, 20)), torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    for model in (
        FlexBertForMaskedLM(cfg),
        FlexBertForTokenClassification(cfg.replace(num_labels=3)),
    ):
        with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 20\)"):
            model(ids, attention_mask=mask, labels=torch.zeros(2, 19, dtype=torch.long))
    sparse = FlexBertForMaskedLM(cfg.replace(sparse_prediction=True))
    with pytest.raises(ValueError, match="labels must have the shape"):
        sparse(
            ids,
            attention_mask=mask,
            labels=torch.zeros(40, dtype=torch.long),
            label_positions=torch.tensor([1, 2]),
        )


def test_an_additive_attention_mask_is_refused_not_inverted(model):
    ids = torch.randint(5, 100, (2, 8))
    additive = torch.zeros(2, 8)
    additive[1, 6:] = float("-inf")
    with pytest.raises(ValueError, match="1 for real tokens and 0 for padding"):
        model(ids, attention_mask=additive)
    model(ids, attention_mask=(additive == 0).float())  # a 0/1 float mask is fine


@pytest.mark.parametrize("padding", ["unpadded", "padded"])
def test_a_batch_without_real_tokens_gives_empty_outputs(padding):
    model = FlexBertModel(ModelConfig.preset("tiny", padding=padding)).eval()
    ids = torch.randint(5, 100, (2, 8))
    out = model(ids, attention_mask=torch.zeros(2, 8, dtype=torch.long)).last_hidden_state
    assert out.shape == (2, 8, 64)
    if padding == "unpadded":
        packed = model(torch.zeros(0, dtype=torch.long), cu_seqlens=torch.tensor([0, 0]))
        assert packed.last_hidden_state.shape == (0, 64)


def test_a_too_long_packed_sequence_names_max_seqlen(model):
    with pytest.raises(ValueError, match="max_seqlen=600 .* exceeds max_seq_len=512"):
        model(torch.randint(5, 100, (600,)), cu_seqlens=torch.tensor([0, 600]))


def test_value_checks_skip_tensors_off_the_cpu_and_never_sync():
    """A meta tensor stands in for a GPU one: its values cannot be read, so a value check
    would fail on it. Shape checks still apply; nothing the host would wait for is run."""
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    ids = torch.empty(26, dtype=torch.long, device="meta")
    with HostSyncRecorder() as syncs:
        check_cu_seqlens(cu, 26, 16)
        check_token_ids(ids, 512)
        check_cu_seqlens(torch.tensor([0, 16, 26], dtype=torch.int32), 26, 16)
        check_token_ids(torch.tensor([5, 6]), 512)
    assert syncs.calls == []
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        check_cu_seqlens(torch.empty(1, 3, dtype=torch.int32, device="meta"), 26, None)


def test_value_checks_are_skipped_while_torch_compile_traces(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check_cu_seqlens(torch.tensor([0, 16, 40], dtype=torch.int32), 26, None)
    check_token_ids(torch.tensor([-1, 9999]), 512)


def test_unknown_preset_override_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        ModelConfig.preset("tiny", nrom="rmsnorm")
    message = str(err.value)
    assert "unknown ModelConfig key(s) ['nrom'] ('nrom': did you mean 'norm'?)" in message
    assert "valid keys are [" in message and "'vocab_size'" in message


def test_unknown_from_hf_override_names_the_key_and_the_valid_ones(tmp_path):
    pytest.importorskip("transformers")
    FlexBertForMaskedLM(ModelConfig.preset("tiny")).save_hf(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown ModelConfig key\(s\) \['hidden_sise'\].*"):
        FlexBertForMaskedLM.from_hf(tmp_path, hidden_sise=32)
    with pytest.raises(ConfigError, match=r"valid keys are \[.*'padding'"):
        FlexBertForMaskedLM.from_hf(tmp_path, paddding="padded")
    assert FlexBertForMaskedLM.from_hf(tmp_path, padding="padded").config.padding == "padded"
