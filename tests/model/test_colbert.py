"""FlexBertForColBERT: MaxSim against a hand-written reference, padded vs unpadded vs packed
layouts, [MASK] query augmentation, the in-batch loss, saving and loading."""

from __future__ import annotations

import pytest
import torch

from flexbert import ConfigError, FlexBertForColBERT, ModelConfig
from flexbert.colbert import maxsim
from flexbert.colbert_settings import settings_of


def _model(padding: str = "unpadded", **kwargs) -> FlexBertForColBERT:
    torch.manual_seed(0)
    return FlexBertForColBERT(ModelConfig.preset("tiny", padding=padding), **kwargs).eval()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(5, 200, (3, 6), generator=g)
    q_mask = torch.ones_like(queries)
    q_mask[0, 4:] = 0
    docs = torch.randint(5, 200, (4, 11), generator=g)
    d_mask = torch.ones_like(docs)
    d_mask[1, 3:] = 0
    d_mask[2, 8:] = 0
    return queries, q_mask, docs, d_mask


def reference_maxsim(q: torch.Tensor, docs: list[torch.Tensor]) -> torch.Tensor:
    """Loops: for each query token, its best dot product over a document's tokens, summed."""
    scores = torch.zeros(q.shape[0], len(docs))
    for a in range(q.shape[0]):
        for n, d in enumerate(docs):
            scores[a, n] = sum(max(float(qt @ dt) for dt in d) for qt in q[a])
    return scores


def test_maxsim_matches_a_hand_written_reference_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, generator=g)
    docs = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    docs[~mask] = 100.0  # padding that would win every max if it counted
    expected = reference_maxsim(q, [docs[n][mask[n]] for n in range(3)])
    torch.testing.assert_close(maxsim(q, docs, mask), expected)


def test_model_scores_are_maxsim_of_normalised_projected_token_vectors():
    model = _model(colbert_dim=16, query_length=8)
    queries, q_mask, docs, d_mask = _batch()
    with torch.no_grad():
        scores = model.score((queries, q_mask), (docs, d_mask))
        hidden_q = model.model(*model.augment_queries(queries, q_mask)).last_hidden_state
        hidden_d = model.model(docs, d_mask).last_hidden_state
        q_vec = torch.nn.functional.normalize(hidden_q @ model.projection.weight.T, dim=-1)
        d_vec = torch.nn.functional.normalize(hidden_d @ model.projection.weight.T, dim=-1)
    expected = reference_maxsim(q_vec, [d_vec[n][d_mask[n].bool()] for n in range(4)])
    assert scores.shape == (3, 4)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    # every query token scores: each of the 8 normalised vectors adds at most 1
    assert bool((scores <= 8 + 1e-4).all()) and bool((scores > 1).all())


def test_padded_unpadded_and_packed_layouts_give_the_same_scores():
    unpadded = _model("unpadded", colbert_dim=16, query_length=8)
    padded = _model("padded", colbert_dim=16, query_length=8)
    padded.load_state_dict(unpadded.state_dict())
    queries, q_mask, docs, d_mask = _batch()
    lengths = d_mask.sum(-1)
    packed = docs[d_mask.bool()]  # (T,) the documents back to back
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    with torch.no_grad():
        a = unpadded.score((queries, q_mask), (docs, d_mask))
        b = padded.score((queries, q_mask), (docs, d_mask))
        c = unpadded.score((queries, q_mask), (packed, None, cu, int(lengths.max())))
        vectors, mask = unpadded.encode_documents(docs, d_mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, d_mask.bool())
    assert float(vectors[~mask].abs().sum()) == 0.0  # padding rows are empty
    torch.testing.assert_close(vectors[mask].norm(dim=-1), torch.ones(int(lengths.sum())))


def test_queries_are_padded_with_mask_tokens_that_are_attended_and_score():
    model = _model(colbert_dim=16, query_length=8)
    mask_id = model.config.mask_token_id
    ids = torch.tensor([[7, 8, 9, 0, 0], [7, 8, 9, 10, 11]])
    attn = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    aug, aug_mask = model.augment_queries(ids, attn)
    assert aug.tolist() == [[7, 8, 9] + [mask_id] * 5, [7, 8, 9, 10, 11] + [mask_id] * 3]
    assert bool(aug_mask.all())
    # the same query padded to any width encodes the same: padding becomes [MASK]
    with torch.no_grad():
        wide = model.encode_queries(ids[:1], attn[:1])
        short = model.encode_queries(ids[:1, :3])
        # the [MASK] tokens change the real tokens' vectors: they are attended
        no_mask = model.token_vectors(ids[:1, :3])[0]
    torch.testing.assert_close(wide, short)
    assert wide.shape == (1, 8, 16)
    assert not torch.allclose(wide[:, :3], no_mask, atol=1e-4)


def test_unattended_mask_tokens_are_computed_as_transformers_computes_them(tmp_path):
    """attend_to_expansion_tokens=False: no token attends to the [MASK]s, each still gets the
    vector transformers' padded attention gives it (the real tokens in its window), every
    layout of the model alike; the setting is saved and read back."""
    from transformers import AutoModel

    ids = torch.tensor([[7, 8, 9, 0, 0], [7, 8, 9, 10, 11]])
    attn = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    attended = _model(colbert_dim=16, query_length=8)
    for padding in ("unpadded", "padded"):
        model = FlexBertForColBERT(
            attended.config.replace(padding=padding), 16, 8, attend_to_expansion_tokens=False
        ).eval()
        model.load_state_dict({**attended.state_dict(), "_extra_state": model.get_extra_state()})
        aug, aug_mask = model.augment_queries(ids, attn)
        assert aug_mask.tolist() == [[1, 1, 1] + [0] * 5, [1] * 5 + [0] * 3]
        model.save_hf(tmp_path / padding)
        hf = AutoModel.from_pretrained(tmp_path / padding, attn_implementation="sdpa").eval()
        with torch.no_grad():
            got = model.encode_queries(ids, attn)
            hidden = hf(aug, attention_mask=aug_mask).last_hidden_state
            expected = torch.nn.functional.normalize(model.projection(hidden), dim=-1)
            assert not torch.allclose(got, attended.eval().encode_queries(ids, attn), atol=1e-4)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        again = FlexBertForColBERT.from_pretrained(tmp_path / padding)
        assert again.attend_to_expansion_tokens is False
    with pytest.raises(ConfigError, match="attend_to_expansion_tokens: true or false"):
        FlexBertForColBERT(ModelConfig.preset("tiny"), attend_to_expansion_tokens="no")
    varlen = ModelConfig.preset("tiny", backend="varlen")  # refused before any GPU is needed
    with pytest.raises(ConfigError, match="padded layout, which backend 'varlen' cannot"):
        FlexBertForColBERT(varlen, attend_to_expansion_tokens=False)
    with pytest.raises(ConfigError, match="true or false, got 'false'"):
        settings_of({"colbert_dim": 8, "query_length": 5, "attend_to_expansion_tokens": "false"})
    with pytest.raises(ValueError, match="keep_padding is for padded"):
        cu = torch.tensor([0, 3], dtype=torch.int32)
        attended.model.encode(ids[0, :3], cu_seqlens=cu, max_seqlen=3, keep_padding=True)


def test_a_query_longer_than_query_length_is_a_clear_error():
    model = _model(query_length=4)
    with pytest.raises(ValueError, match="more than query_length=4"):
        model.encode_queries(torch.tensor([[5, 6, 7, 8, 9]]))
    with torch.no_grad():  # padding past query_length is fine
        out = model.encode_queries(torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    assert out.shape[1] == 4


@pytest.mark.parametrize(
    "kwargs, name", [({"colbert_dim": 0}, "colbert_dim"), ({"query_length": 2.5}, "query_length")]
)
def test_bad_settings_name_the_field(kwargs, name):
    with pytest.raises(ConfigError, match=f"{name}: a positive integer"):
        FlexBertForColBERT(ModelConfig.preset("tiny"), **kwargs)


def test_loss_is_in_batch_cross_entropy_over_maxsim_without_temperature():
    model = _model(colbert_dim=16, query_length=8)
    queries, q_mask, docs, d_mask = _batch()
    labels = torch.tensor([2, 0, 1])
    out = model(queries, q_mask, candidates=(docs, d_mask), labels=labels)
    with torch.no_grad():
        scores = model.score((queries, q_mask), (docs, d_mask))
    torch.testing.assert_close(out.logits.detach(), scores)
    expected = torch.nn.functional.cross_entropy(scores, labels)
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert model.projection.weight.grad.abs().sum() > 0
    default = model(queries[:3], q_mask[:3], candidates=(docs[:3], d_mask[:3])).loss
    diag = torch.nn.functional.cross_entropy(scores[:, :3], torch.arange(3))
    torch.testing.assert_close(default.detach(), diag)


def test_save_and_from_pretrained_give_identical_scores(tmp_path):
    model = _model(colbert_dim=24, query_length=6)
    with torch.no_grad():
        model.projection.weight.normal_()  # not the init: the saved weights must be read
    queries, q_mask, docs, d_mask = _batch()
    model.save_hf(tmp_path / "colbert")
    loaded = FlexBertForColBERT.from_pretrained(tmp_path / "colbert").eval()
    assert (loaded.colbert_dim, loaded.query_length) == (24, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.score((queries, q_mask), (docs, d_mask)),
            model.score((queries, q_mask), (docs, d_mask)),
        )
    with pytest.raises(ConfigError, match="holds a ColBERT head"):
        FlexBertForColBERT.from_hf(tmp_path / "colbert", colbert_dim=128)


def test_from_pretrained_refuses_a_plain_encoder_and_from_hf_starts_a_projection(tmp_path):
    from flexbert import FlexBertForMaskedLM

    FlexBertForMaskedLM(ModelConfig.preset("tiny")).save_hf(tmp_path / "mlm")
    with pytest.raises(FileNotFoundError, match="not a saved ColBERT model"):
        FlexBertForColBERT.from_pretrained(tmp_path / "mlm")
    model = FlexBertForColBERT.from_hf(tmp_path / "mlm", colbert_dim=8)
    assert model.projection.weight.shape == (8, model.config.hidden_size)


def test_settings_travel_in_the_state_dict():
    model = _model(colbert_dim=8, query_length=5)
    state = model.state_dict()
    assert FlexBertForColBERT.settings_from_state_dict(state) == {
        "colbert_dim": 8,
        "query_length": 5,
        "query_marker_id": None,
        "document_marker_id": None,
        "skiplist_ids": None,
        "attend_to_expansion_tokens": True,
    }
    other = FlexBertForColBERT(ModelConfig.preset("tiny"), colbert_dim=8, query_length=7)
    with pytest.raises(ConfigError, match="ColBERT settings"):
        other.load_state_dict(state)
    marked = FlexBertForColBERT(ModelConfig.preset("tiny"), 8, 5, query_marker_id=9)
    with pytest.raises(ConfigError, match="ColBERT settings"):
        marked.load_state_dict(state)
    # saved before markers existed: no markers
    old = {**state, "_extra_state": {"colbert_dim": 8, "query_length": 5}}
    FlexBertForColBERT(ModelConfig.preset("tiny"), colbert_dim=8, query_length=5).load_state_dict(
        old
    )
    assert FlexBertForColBERT.settings_from_state_dict(old)["query_marker_id"] is None
    assert FlexBertForColBERT.settings_from_state_dict(old)["attend_to_expansion_tokens"]


MARKERS = {"query_marker_id": 3, "document_marker_id": 4}


def test_markers_follow_cls_in_queries_and_documents_in_every_layout():
    """[Q] / [D] after each sequence's first token: the queries and documents a model with
    markers encodes are exactly those ids, padded, unpadded or packed."""
    from flexbert.colbert import insert_marker

    marked = _model(colbert_dim=16, query_length=8, **MARKERS)
    plain = _model(colbert_dim=16, query_length=8)
    plain.load_state_dict({**marked.state_dict(), "_extra_state": plain.get_extra_state()})
    queries, q_mask, docs, d_mask = _batch()
    aug, _ = marked.augment_queries(queries, q_mask)
    assert aug[:, 1].tolist() == [3, 3, 3] and aug[0, :6].tolist() == [
        queries[0, 0].item(),
        3,
        *queries[0, 1:4].tolist(),
        marked.config.mask_token_id,
    ]
    lengths = d_mask.sum(-1)
    packed = docs[d_mask.bool()]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    by_hand = [torch.cat([d[:1], torch.tensor([4]), d[1:n]]) for d, n in zip(docs, lengths)]
    ids, _, cu_marked, longest = insert_marker(packed, None, cu, int(lengths.max()), 4)
    assert torch.equal(ids, torch.cat(by_hand)) and longest == int(lengths.max()) + 1
    assert cu_marked.tolist() == (cu + torch.arange(5, dtype=torch.int32)).tolist()
    wide = torch.nn.utils.rnn.pad_sequence(by_hand, batch_first=True)  # (4, 12)
    wide_mask = (torch.arange(wide.shape[1]) < (lengths + 1)[:, None]).long()
    with torch.no_grad():
        vectors, mask = marked.encode_documents(docs, d_mask)
        from_packed, _ = marked.encode_documents(packed, None, cu, int(lengths.max()))
        expected, _ = plain.token_vectors(wide, wide_mask)  # the marked ids, by hand
        scores = marked.score((queries, q_mask), (docs, d_mask))
        unmarked = plain.score((queries, q_mask), (docs, d_mask))
    assert torch.equal(mask, wide_mask.bool())
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_packed, vectors, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores, unmarked, atol=1e-3)  # the markers change the vectors


def test_a_marker_keeps_padding_out_and_a_too_long_document_names_it():
    from flexbert.colbert import insert_marker

    ids = torch.tensor([[1, 5, 6, 2], [0, 0, 0, 0]])  # the second row: all padding
    _, mask, _, _ = insert_marker(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), marker=9)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    model = _model(**MARKERS)
    longest = model.config.max_seq_len
    with pytest.raises(
        ValueError, match=f"its marker exceed max_seq_len={longest}.*max_length={longest - 1}"
    ):
        model.encode_documents(torch.full((1, longest), 7))


def test_markers_are_saved_and_checked(tmp_path):
    model = _model(colbert_dim=16, query_length=8, **MARKERS)
    model.save_hf(tmp_path / "marked")
    loaded = FlexBertForColBERT.from_pretrained(tmp_path / "marked")
    assert loaded.get_extra_state() == model.get_extra_state()
    with pytest.raises(ConfigError, match="holds a ColBERT head"):
        FlexBertForColBERT.from_hf(tmp_path / "marked", query_marker_id=5)
    with pytest.raises(ConfigError, match=r"query_marker_id: a token id in \[0, 512\)"):
        _model(query_marker_id=512)
    with pytest.raises(ConfigError, match="query_length: at least 2"):
        _model(query_length=1, query_marker_id=3)
    with pytest.raises(ValueError, match="more than query_length=4.*max_length=3"):
        _model(query_length=4, query_marker_id=3).encode_queries(torch.tensor([[5, 6, 7, 8]]))


def test_skiplisted_document_tokens_never_score_in_any_layout(tmp_path):
    """Document tokens in the skiplist (PyLate: punctuation) are out of MaxSim: the scores
    equal MaxSim over the other tokens' vectors, padded or packed; queries keep theirs."""
    queries, q_mask, docs, d_mask = _batch()
    skip = [int(docs[0, 2]), int(docs[2, 5])]
    model = _model(colbert_dim=16, query_length=8, skiplist_ids=skip, **MARKERS)
    plain = _model(colbert_dim=16, query_length=8, **MARKERS)
    plain.load_state_dict({**model.state_dict(), "_extra_state": plain.get_extra_state()})
    lengths = d_mask.sum(-1)
    packed = docs[d_mask.bool()]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    with torch.no_grad():
        vectors, mask = model.encode_documents(docs, d_mask)
        from_packed, packed_mask = model.encode_documents(packed, None, cu, int(lengths.max()))
        all_vectors, all_mask = plain.encode_documents(docs, d_mask)
        q = plain.encode_queries(queries, q_mask)
        scores = model.score((queries, q_mask), (docs, d_mask))
        packed_scores = model.score((queries, q_mask), (packed, None, cu, int(lengths.max())))
    marked = torch.cat([docs[:, :1], torch.full((4, 1), 4), docs[:, 1:]], 1)  # with [D]
    listed = torch.isin(marked, torch.tensor(skip))
    assert int((all_mask & listed).sum()) >= 2  # some real tokens are skiplisted
    assert torch.equal(mask, all_mask & ~listed) and torch.equal(packed_mask, mask)
    assert float(vectors[listed].abs().sum()) == 0.0
    torch.testing.assert_close(vectors[mask], all_vectors[mask])
    kept = [all_vectors[n][mask[n]] for n in range(4)]
    torch.testing.assert_close(scores, reference_maxsim(q, kept), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed_scores, scores, rtol=1e-5, atol=1e-5)
    assert torch.allclose(from_packed, vectors, atol=1e-5)
    model.save_hf(tmp_path / "skip")
    assert FlexBertForColBERT.from_pretrained(tmp_path / "skip").skiplist_ids == sorted(set(skip))
    again = [*reversed(skip), skip[0]]  # the same set in another order
    assert FlexBertForColBERT.from_hf(tmp_path / "skip", skiplist_ids=again).skiplist_ids == sorted(
        set(skip)
    )
    with pytest.raises(ConfigError, match=r"skiplist_ids: token ids in \[0, 512\)"):
        _model(skiplist_ids=[600])
