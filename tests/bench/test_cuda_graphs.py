"""The `+cudagraph` lever: which graph a call replays, what it copies in, when it falls back."""

from __future__ import annotations

import pytest
import torch

import flexbert
from flexbert.bench import runners, workloads
from flexbert.bench.cuda_graphs import GraphedForward
from tests.conftest import requires_gpu


class ReplayOnCPU(GraphedForward):
    """Stands in for capture on the CPU: "replay" reruns the model on the static inputs and
    writes into the captured output tensor, which is what a real graph replay does."""

    def _capture(self, kwargs):
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = self.model(**static)
        model = self.model

        class Graph:
            def replay(self) -> None:
                out.last_hidden_state.copy_(model(**static).last_hidden_state)

        return static, Graph(), out


def _packed(lengths, seed, device="cpu"):
    docs = workloads.make_documents(lengths, runners.id_range(["tiny"]), seed=seed)
    return workloads.packed_batch(docs, device).kwargs


@pytest.fixture
def model():
    torch.manual_seed(0)
    return flexbert.FlexBertModel(flexbert.ModelConfig.preset("tiny")).eval()


def test_a_replay_sees_the_new_inputs_of_the_same_shape(model):
    graphed = ReplayOnCPU(model)
    first, second = _packed([20, 33], seed=1), _packed([20, 33], seed=2)
    with torch.inference_mode():
        out_first = graphed(**first).last_hidden_state.clone()
        out = graphed(**second)
        torch.testing.assert_close(out_first, model(**first).last_hidden_state)
        torch.testing.assert_close(out.last_hidden_state, model(**second).last_hidden_state)
    assert len(graphed.graphs) == 1  # one shape: captured once, replayed after
    assert not torch.equal(out_first, out.last_hidden_state)


def test_each_shape_gets_its_graph_until_the_cap_then_eager(model):
    graphed = ReplayOnCPU(model, max_graphs=2)
    with torch.inference_mode():
        a = graphed(**_packed([20, 33], seed=1))
        graphed(**_packed([20, 30], seed=1))
        extra = _packed([5, 9], seed=1)
        eager = graphed(**extra)
        again = graphed(**_packed([20, 33], seed=3))
        expected = model(**extra).last_hidden_state
    assert len(graphed.graphs) == 2
    assert again is a  # the first graph's own output object, refilled
    torch.testing.assert_close(eager.last_hidden_state, expected)


def test_cpu_tensors_are_refused_by_name(model):
    with pytest.raises(ValueError, match="'input_ids' is on cpu"):
        GraphedForward(model)(**_packed([8], seed=0))


@pytest.mark.parametrize(("device", "mlm"), [("cpu", False), ("cuda", True)])
def test_the_bench_refuses_cudagraph_where_it_cannot_run(device, mlm):
    spec = runners.ModelSpec.parse("flexbert", "tiny", "sdpa+cudagraph")
    assert spec.cuda_graph and spec.variant == "sdpa+cudagraph" and not spec.plain
    with pytest.raises(ValueError, match="CUDA graphs are an inference lever"):
        runners.build_model(spec, device, torch.float32, mlm=mlm)


@requires_gpu
def test_captured_forward_equals_eager_on_gpu():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = flexbert.FlexBertModel(flexbert.ModelConfig.preset("tiny", backend="auto"))
    model = model.to(torch.bfloat16).eval()
    graphed = GraphedForward(model)
    with torch.inference_mode():
        for seed in (1, 2):
            batch = _packed([40, 100, 7], seed=seed, device="cuda")
            torch.testing.assert_close(
                graphed(**batch).last_hidden_state, model(**batch).last_hidden_state
            )
    assert len(graphed.graphs) == 1
