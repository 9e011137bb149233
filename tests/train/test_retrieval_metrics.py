"""Corpus-level retrieval metrics: every query ranked against every eval positive."""

from __future__ import annotations

import math

import pytest
import torch

from flexbert import ConfigError
from flexbert.train.finetune_retrieval import positive_ranks, retrieval_metrics


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float), dim=-1)


def test_ranks_count_the_docs_that_score_above_each_querys_own_positive():
    docs = _unit([[1, 0], [0, 1], [1, 1], [-1, 0]])
    queries = _unit([[1, 0.1], [1, 0], [0.2, 1], [-1, 0]])
    # query 0: doc0 best -> 1; query 1: doc0 (1.0) > doc2 (.71) > doc1 (0) -> 3;
    # query 2: doc1 .98 > doc2 .83 -> own doc2 rank 2; query 3: doc3 exact -> 1
    assert positive_ranks(queries, docs, chunk=3).tolist() == [1, 3, 2, 1]


def test_metric_values_from_known_ranks():
    docs = _unit([[1, 0], [0, 1], [1, 1], [-1, 0]])
    queries = _unit([[1, 0.1], [1, 0], [0.2, 1], [-1, 0]])  # ranks 1, 3, 2, 1
    metrics = retrieval_metrics(["ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10"])
    for m in metrics.values():
        m.update(queries[:2], docs[:2])  # batches of the eval split, in order
        m.update(queries[2:], docs[2:])
    values = {k: float(m.compute()) for k, m in metrics.items()}
    assert values["recall_at_1"] == pytest.approx(0.5)
    assert values["recall_at_10"] == pytest.approx(1.0)
    assert values["mrr_at_10"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1) / 4)
    ndcg = (1 + 1 / math.log2(4) + 1 / math.log2(3) + 1) / 4
    assert values["ndcg_at_10"] == pytest.approx(ndcg)


def test_batching_of_the_eval_split_does_not_change_the_metric():
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=-1)
    docs = torch.nn.functional.normalize(queries + 0.8 * torch.randn(50, 8, generator=gen), dim=-1)
    values = []
    for size in (7, 50):
        (metric,) = retrieval_metrics(["ndcg_at_10"]).values()
        for start in range(0, 50, size):
            metric.update(queries[start : start + size], docs[start : start + size])
        values.append(float(metric.compute()))
    assert values[0] == pytest.approx(values[1]) and 0 < values[0] < 1


def test_unknown_retrieval_metrics_are_named():
    with pytest.raises(ConfigError, match=r"\['accuracy'\] do not apply to retrieval"):
        retrieval_metrics(["ndcg_at_10", "accuracy"])


def test_the_metrics_of_a_task_keep_and_rank_the_embeddings_once(monkeypatch):
    """Composer updates every metric with every batch; the first one feeds the shared store,
    so one copy is kept, it is ranked once per evaluation (however many metrics), a deep copy
    of the metrics (as Composer makes) still shares it, and reset starts a new evaluation."""
    import copy

    import flexbert.train.finetune_retrieval as fr

    calls = []
    ranks = fr.positive_ranks
    monkeypatch.setattr(fr, "positive_ranks", lambda *a, **k: calls.append(1) or ranks(*a, **k))
    docs = _unit([[1, 0], [0, 1], [1, 1], [-1, 0]])
    queries = _unit([[1, 0.1], [1, 0], [0.2, 1], [-1, 0]])  # ranks 1, 3, 2, 1
    metrics = copy.deepcopy(retrieval_metrics(["recall_at_1", "recall_at_10", "mrr_at_10"]))
    stores = {id(m.store) for m in metrics.values()}
    assert len(stores) == 1
    for _ in range(2):  # two evaluations
        for m in metrics.values():
            m.reset()
        for start in (0, 2):
            for m in metrics.values():
                m.update(queries[start : start + 2], docs[start : start + 2])
        values = [float(m.compute()) for m in metrics.values()]
        assert values == pytest.approx([0.5, 1.0, (1 + 1 / 3 + 1 / 2 + 1) / 4])
        assert len(next(iter(metrics.values())).store.queries) == 2  # one copy of 2 batches
    assert len(calls) == 2  # ranked once per evaluation


@pytest.mark.slow
def test_shared_ranking_metrics_gather_every_ranks_half_of_the_corpus(two_ranks):
    """Two processes (gloo), each with half of the eval pairs: every rank's metrics equal one
    process ranking all pairs (the shared store syncs once, in the same order on all ranks)."""
    from tests.train.two_rank_worker import RETRIEVAL, retrieval_pairs

    queries, docs = retrieval_pairs()
    one = retrieval_metrics(RETRIEVAL)
    for m in one.values():
        m.update(queries, docs)
    expected = [float(m.compute()) for m in one.values()]
    assert 0 < expected[0] < 1  # not trivially perfect or zero
    assert two_ranks("retrieval") == [pytest.approx(expected)] * 2
