"""The packed path never makes the host wait for the device (checked on the CPU by op).

A host sync on a GPU stalls the launch queue, breaks CUDA graph capture and splits compiled
graphs; `HostSyncRecorder` sees the operations that would cause one on any device.
"""

from __future__ import annotations

import pytest
import torch

from flexbert import FlexBertForMaskedLM, FlexBertModel, ModelConfig
from flexbert.bench.host_syncs import HostSyncRecorder
from flexbert.data.masking import label_positions
from tests.conftest import ragged_batch


def _packed(seed: int = 0):
    ids, mask = ragged_batch([30, 18, 25], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    labels = ids.masked_fill((torch.rand(ids.shape, generator=gen) > 0.3) | ~mask, -100)
    cu = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).int()
    inputs = {"input_ids": ids[mask], "cu_seqlens": cu, "max_seqlen": 30}
    return inputs, labels[mask], (ids, mask)


def test_the_recorder_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with HostSyncRecorder() as syncs:
        x.sum().item()
        _ = x[x > 2]
        torch.nonzero(x)
        bool(x.any())
        torch.equal(x, x)
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1]))
        _ = x.index_select(0, torch.tensor([1, 2]))  # fixed-size gather: no sync
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1]), output_size=6)  # no sync
    ops = [op for op, _ in syncs.calls]
    assert ops == [
        "_local_scalar_dense",
        "index",
        "nonzero",
        "_local_scalar_dense",
        "equal",
        "repeat_interleave",
    ]
    assert all(where == "outside flexbert" for _, where in syncs.calls)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_sparse_mlm_step_has_no_host_sync(backend):
    """Forward, sparse MLM loss and backward on a packed batch with the loader's
    label_positions: nothing the host waits for. Without the positions, the head's own
    boolean selection is the one sync, and the recorder names its line."""
    inputs, labels, _ = _packed()
    torch.manual_seed(0)
    model = FlexBertForMaskedLM(ModelConfig.preset("tiny", backend=backend, sparse_prediction=True))
    positions = label_positions(labels)
    with HostSyncRecorder() as syncs:
        model(**inputs, labels=labels, label_positions=positions).loss.backward()
    assert syncs.calls == []
    with HostSyncRecorder() as syncs:
        model(**inputs, labels=labels).loss.backward()
    assert [op for op, _ in syncs.calls] == ["nonzero"]
    assert syncs.calls[0][1].startswith("flexbert/heads.py:")


@pytest.mark.parametrize("backend", ["sdpa", "eager"])  # flex compiles: not under a mode
def test_packed_inference_has_no_host_sync_and_padded_input_two(backend):
    """What CUDA graph capture relies on: the packed encoder forward is sync-free. A padded
    batch unpadded at the entry needs its token count and longest row (two syncs, at the
    entry only, whatever the number of layers)."""
    inputs, _, (ids, mask) = _packed()
    model = FlexBertModel(ModelConfig.preset("tiny", backend=backend)).eval()
    with torch.no_grad():
        with HostSyncRecorder() as syncs:
            model(**inputs)
        assert syncs.calls == []
        with HostSyncRecorder() as syncs:
            model(ids, attention_mask=mask)
    assert {where.split(":")[0] for _, where in syncs.calls} == {"flexbert/layout.py"}
    assert len(syncs.calls) == 2


def test_copies_from_a_device_to_the_host_count_as_syncs():
    """(A meta tensor stands in for a GPU one: only the device types matter.)"""
    from flexbert.bench.host_syncs import aten, is_syncing

    gpu, host = torch.empty(3, device="meta"), torch.empty(3)
    to_host = {"device": torch.device("cpu")}
    assert is_syncing(aten._to_copy.default, (gpu,), to_host)
    assert is_syncing(aten.copy_.default, (host, gpu), {})
    assert not is_syncing(aten._to_copy.default, (host,), {"device": torch.device("meta")})
    assert not is_syncing(aten.copy_.default, (gpu, host), {})  # host -> device: async
    assert not is_syncing(aten._to_copy.default, (gpu,), {"dtype": torch.float16})
