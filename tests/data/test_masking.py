import pytest
import torch

from flexbert.data.errors import DataError
from flexbert.data.masking import IGNORE_INDEX, MLMMasker, batch_generator
from flexbert.data.tokenizer import allowed_token_ids

MASK, PAD, CLS, SEP = 3, 0, 1, 2
SPECIAL = {PAD, CLS, SEP, MASK, 4}
ALLOWED = list(range(100, 200))


def make_batch(n_rows=64, length=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n_rows, length), generator=g)
    ids[:, 0], ids[:, -1], ids[:, -10:-1] = CLS, SEP, PAD
    return ids


@pytest.mark.parametrize("p", [0.30, 0.15])
def test_rates_80_10_10_and_specials_untouched(p):
    masker = MLMMasker(MASK, ALLOWED, SPECIAL, mlm_probability=p)
    ids = make_batch()
    out, labels = masker(ids, torch.Generator().manual_seed(1))
    candidates = ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    selected = labels != IGNORE_INDEX
    assert not (selected & ~candidates).any()
    assert torch.equal(out[~candidates], ids[~candidates])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(out[~selected], ids[~selected])
    rate = selected.sum().item() / candidates.sum().item()
    assert abs(rate - p) < 0.01
    n = selected.sum().item()
    masked = (out == MASK) & selected
    changed = selected & (out != ids) & ~masked
    kept = selected & (out == ids)
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs((changed.sum().item() + kept.sum().item()) / n - 0.2) < 0.02
    assert 0.07 < kept.sum().item() / n < 0.13  # 10% kept (+ random draws equal to the original)


def test_random_replacements_come_only_from_allowed_ids():
    masker = MLMMasker(
        MASK, ALLOWED, SPECIAL, mlm_probability=1.0, mask_fraction=0.0, random_fraction=1.0
    )
    ids = make_batch()
    out, labels = masker(ids, torch.Generator().manual_seed(2))
    selected = labels != IGNORE_INDEX
    replaced = out[selected]
    assert set(replaced.unique().tolist()) <= set(ALLOWED)
    assert len(replaced.unique()) == len(ALLOWED)  # drawn from the vocabulary, not the batch


def test_seeded_masks_are_reproducible_and_differ_by_batch():
    masker = MLMMasker(MASK, ALLOWED, SPECIAL)
    ids = make_batch(8, 128)
    a = masker(ids, batch_generator(7, 0, 3))
    b = masker(ids, batch_generator(7, 0, 3))
    c = masker(ids, batch_generator(7, 0, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_from_tokenizer_protects_unused_and_specials(tokenizer):
    masker = MLMMasker.from_tokenizer(tokenizer, mlm_probability=1.0)
    unused = [i for t, i in tokenizer.get_vocab().items() if t.startswith("[unused")]
    assert unused and not set(unused) & set(masker.allowed_ids.tolist())
    assert masker.allowed_ids.tolist() == allowed_token_ids(tokenizer)
    ids = torch.tensor(
        [tokenizer.cls_token_id, *unused, 300, 301, tokenizer.sep_token_id, tokenizer.pad_token_id]
    )
    _, labels = masker(ids, torch.Generator().manual_seed(0))
    assert (labels != IGNORE_INDEX).tolist() == [False] * (1 + len(unused)) + [
        True,
        True,
        False,
        False,
    ]


def test_bad_settings():
    with pytest.raises(DataError, match="mlm_probability"):
        MLMMasker(MASK, ALLOWED, SPECIAL, mlm_probability=1.5)
    with pytest.raises(DataError, match="allowed_ids"):
        MLMMasker(MASK, [], SPECIAL)


def test_added_tokens_that_are_ordinary_text_are_masked_like_any_other(tokenizer):
    """A tokenizer with an added run of spaces (special=False, as code tokenizers add for
    indentation): it is masked and may replace others; a special added token is not."""
    import copy

    from tokenizers import AddedToken

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([AddedToken("    ", special=False, normalized=False)])
    tok.add_special_tokens({"additional_special_tokens": ["[EXTRA]"]})
    spaces, extra = tok.convert_tokens_to_ids(["    ", "[EXTRA]"])
    masker = MLMMasker.from_tokenizer(tok, mlm_probability=1.0)
    assert spaces in masker.allowed_ids.tolist() and extra not in masker.allowed_ids.tolist()
    _, labels = masker(torch.tensor([tok.cls_token_id, spaces, extra, 300, tok.sep_token_id]))
    assert (labels != IGNORE_INDEX).tolist() == [False, True, False, True, False]
