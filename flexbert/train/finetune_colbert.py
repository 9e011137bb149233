"""ColBERT (multi-vector, late-interaction) retrieval fine-tuning: (query, positive) pairs.

The data and its batches are retrieval's (`retrieval_data`: queries cut to
`task.query_length` tokens, documents, positives and hard negatives, to `task.doc_max_len`,
each one token shorter where the model adds a [Q] / [D] marker), and so are the ranking
metrics (`finetune_retrieval`: nDCG@10 / MRR@10 / recall@1 / recall@10 over the whole eval
split).
What changes is the model (`FlexBertForColBERT`: one vector per token, MaxSim scores) and so
the corpus metric, which keeps every eval document's token vectors. Training: in-batch
cross-entropy over MaxSim scores, every other positive of the batch a negative, and every
hard negative (`task.negative_fields`); with several ranks, every rank's positives and hard
negatives (`task.gather_negatives`, as retrieval does). Or, with a teacher's scores for each
query's positive and hard negatives (`task.teacher_scores_field`), distillation as PyLate
does it (the paper's ColBERT setting distils a teacher's scores).
The export (`hf/`) is the encoder as a ModernBertModel directory plus the projection and the
ColBERT settings: `FlexBertForColBERT.from_pretrained(dir)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from flexbert.colbert import ColBERTOutput, FlexBertForColBERT, maxsim, maxsim_per_query
from flexbert.colbert_settings import check_positive_int
from flexbert.registry import ConfigError
from flexbert.train.finetune_retrieval import (
    ComposerFlexBertRetrieval,
    CorpusEmbeddings,
    CorpusRetrievalMetric,
    gather_with_grad,
    positive_ranks,
)
from flexbert.train.retrieval_data import candidate_inputs, encode_pairs, per_query

QUERY_CHUNK = 32  # eval queries scored at a time
SCORE_BUDGET = 1 << 26  # elements of one (queries, docs, query tokens, doc tokens) block


MARKER_OPTIONS = {"query_marker_id": "query_marker", "document_marker_id": "document_marker"}
DEFAULTS = {"colbert_dim": 128, "query_length": 32}  # ColBERT's


def colbert_settings(task: Mapping[str, Any], tokenizer: Any = None) -> dict[str, Any]:
    """colbert_dim, query_length (DEFAULTS when unset), the ids of the marker tokens
    task.query_marker / task.document_marker and of task.skiplist (None when unset) from the
    task node; `tokenizer` turns the tokens into ids."""
    settings: dict[str, Any] = {k: task.get(k, v) for k, v in DEFAULTS.items()}
    settings["attend_to_expansion_tokens"] = task.get("attend_to_expansion_tokens", True)
    wanted = [o for o in (*MARKER_OPTIONS.values(), "skiplist") if task.get(o) is not None]
    if wanted and tokenizer is None:
        raise ConfigError(f"task.{wanted[0]}: a tokenizer is needed to read its tokens")
    vocab = tokenizer.get_vocab() if wanted else {}  # read once: a dict of the whole vocabulary
    for key, option in MARKER_OPTIONS.items():
        token = task.get(option)
        if token is None:
            settings[key] = None
            continue
        if not isinstance(token, str):
            raise ConfigError(
                f"task.{option}: a token (a string) or null, got {token!r}; on the command "
                f"line quote a bracketed token: 'task.{option}=\"[unused0]\"'"
            )
        if token not in vocab:
            raise ConfigError(
                f"task.{option}: {token!r} is not a token of the tokenizer; give one of its "
                "reserved tokens (e.g. [unused0]) or null for no marker"
            )
        settings[key] = int(vocab[token])
    markers = [settings[k] for k in MARKER_OPTIONS]
    if markers[0] is not None and markers[0] == markers[1]:
        raise ConfigError(
            "task.query_marker and task.document_marker are the same token; ColBERT tells "
            "queries from documents by them: give two (e.g. [unused0] and [unused1])"
        )
    settings["skiplist_ids"] = skiplist_ids(task.get("skiplist"), vocab)
    return settings


def skiplist_ids(skiplist: Any, vocab: Mapping[str, int]) -> list[int] | None:
    """Token ids of task.skiplist in the tokenizer's `vocab`: "punctuation" (PyLate's
    default: each ASCII punctuation character that is a token of the vocabulary), a list of
    tokens (each must be one), or null (every document token scores)."""
    import string

    if skiplist is None:
        return None
    if skiplist == "punctuation":
        return sorted({vocab[c] for c in string.punctuation if c in vocab})
    if isinstance(skiplist, str) or not all(isinstance(t, str) for t in skiplist):
        raise ConfigError(
            f"task.skiplist: 'punctuation', a list of tokens or null, got {skiplist!r}"
        )
    missing = [t for t in skiplist if t not in vocab]
    if missing:
        raise ConfigError(f"task.skiplist: {missing} are not tokens of the tokenizer")
    return sorted({vocab[t] for t in skiplist})


def load_colbert_model(
    path: Any, task: Mapping[str, Any], tokenizer: Any = None, **overrides: Any
) -> FlexBertForColBERT:
    """FlexBertForColBERT over the encoder of any ModernBERT checkpoint: a Hugging Face
    directory or Hub id, a run folder or Composer checkpoint. A ColBERT model (a saved `hf/`,
    or a ColBERT fine-tuning run's checkpoint) keeps its projection and continues under the
    task's settings (`with_task_settings`); any other starts a fresh projection, as every
    model does with `task.fresh_projection`. `tokenizer` resolves the marker and skiplist
    tokens."""
    from flexbert import FlexBertModel
    from flexbert.train.checkpoints import (
        find_run_checkpoint,
        load_checkpoint_model,
        load_pretrained,
        read_model_config,
    )

    settings = colbert_settings(task, tokenizer)
    if task.get("fresh_projection"):  # the encoder alone, even of a ColBERT
        return FlexBertForColBERT.from_encoder(
            load_pretrained(path, FlexBertModel, **overrides), **settings
        )
    run = find_run_checkpoint(path)
    if run is None:
        from flexbert.colbert_settings import read_saved_head
        from flexbert.hf import resolve_model_dir

        folder = resolve_model_dir(path)
        head = read_saved_head(folder)  # a ColBERT: the task's settings replace its own below
        if head is None:
            model = FlexBertForColBERT.from_hf(folder, **settings, **overrides)
        else:
            model = FlexBertForColBERT.from_saved_head(folder, head, **overrides)
        where = str(path)
    elif run.task_type != "colbert":
        encoder = load_pretrained(path, FlexBertModel, **overrides)
        return FlexBertForColBERT.from_encoder(encoder, **settings)
    else:
        config = read_model_config(run.config)
        source = load_checkpoint_model(run.checkpoint, config, FlexBertForColBERT)
        model = FlexBertForColBERT(config.replace(**overrides), **source.get_extra_state())
        model.load_state_dict(source.state_dict())
        where = str(run.checkpoint)
    return with_task_settings(model, settings, where)


def with_task_settings(
    model: FlexBertForColBERT, settings: dict[str, Any], where: str
) -> FlexBertForColBERT:
    """A saved ColBERT continued under the task's settings: its projection must have
    task.colbert_dim outputs; query_length, the markers and the skiplist hold no weights, so
    the task's replace the saved ones (a warning names each change)."""
    import logging

    saved = model.get_extra_state()
    if saved["colbert_dim"] != settings["colbert_dim"]:
        raise ConfigError(
            f"task.colbert_dim={settings['colbert_dim']}, but {where} holds a ColBERT "
            f"projection of {saved['colbert_dim']}: set task.colbert_dim={saved['colbert_dim']} "
            "to continue it, or task.fresh_projection=true to start a new one on its encoder"
        )
    changed = {k: (saved[k], v) for k, v in settings.items() if saved[k] != v}
    if not changed:
        return model
    options = {"query_length": "query_length", "skiplist_ids": "skiplist", **MARKER_OPTIONS}
    options["attend_to_expansion_tokens"] = "attend_to_expansion_tokens"
    logging.getLogger(__name__).warning(
        "%s: continuing with the task's ColBERT settings, not the saved ones: %s",
        where,
        "; ".join(f"task.{options[k]}: {old!r} -> {new!r}" for k, (old, new) in changed.items()),
    )
    fresh = FlexBertForColBERT(model.config, **settings)
    fresh.load_state_dict({**model.state_dict(), "_extra_state": fresh.get_extra_state()})
    return fresh


def document_length(task: Mapping[str, Any], max_len: int) -> int:
    """The length documents are cut to, their marker counted: task.doc_max_len, at most
    max_len (data.max_seq_len); unset, max_len."""
    value = task.get("doc_max_len") or max_len
    check_positive_int("task.doc_max_len", value)
    return min(value, max_len)


def encode_colbert_pairs(
    ds: Any,
    task: Mapping[str, Any],
    tokenizer: Any,
    max_len: int,
    split: str,
    for_training: bool = True,
) -> list[dict[str, Any]]:
    """Retrieval's pairs (and hard negatives for training), queries cut to
    task.query_length, documents to task.doc_max_len (at most max_len, data.max_seq_len;
    unset: max_len), one token less each where the model adds a marker."""
    query_len = task.get("query_length", DEFAULTS["query_length"])
    check_positive_int("task.query_length", query_len)
    # a marker (inserted by the model after [CLS]) takes one of each length's tokens
    lengths = {"doc_max_len": document_length(task, max_len), "query_length": query_len}
    for name, marker in (("doc_max_len", "document_marker"), ("query_length", "query_marker")):
        if task.get(marker) is not None:
            if lengths[name] < 3:
                raise ConfigError(
                    f"task.{name}: at least 3 with task.{marker} ([CLS], it, a token)"
                )
            lengths[name] -= 1
    doc_len, query_len = lengths["doc_max_len"], lengths["query_length"]
    return encode_pairs(ds, task, tokenizer, doc_len, split, query_len, for_training)


def padded_chunks(
    flat: torch.Tensor, lengths: torch.Tensor, tokens_per_chunk: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Documents stored as their (sum of lengths, d) token vectors -> (docs (n, T, d), mask
    (n, T)) chunks in order, each padded to its own longest document, with at most
    `tokens_per_chunk` padded tokens (at least one document) in each."""
    if lengths.numel() == 0:
        return []
    per_chunk = max(1, tokens_per_chunk // int(lengths.max()))
    ends = torch.cumsum(lengths, 0)
    chunks = []
    for start in range(0, lengths.shape[0], per_chunk):
        part = lengths[start : start + per_chunk]  # (n,)
        first, last = int(ends[start] - lengths[start]), int(ends[start + part.shape[0] - 1])
        mask = torch.arange(int(part.max()), device=flat.device)[None, :] < part[:, None]
        docs = flat.new_zeros((*mask.shape, flat.shape[-1]))  # (n, T, d)
        docs[mask] = flat[first:last]
        chunks.append((docs, mask))
    return chunks


class MaxSimEmbeddings(CorpusEmbeddings):
    """Retrieval's corpus store for ColBERT: every eval query's token vectors and every eval
    document's (kept without their padding, so each rank's documents concatenate in rank
    order like retrieval's vectors), ranked by MaxSim in memory-bounded chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("doc_lengths", default=[], dist_reduce_fx="cat")

    def update(  # type: ignore[override]
        self, queries: torch.Tensor, docs: torch.Tensor, doc_mask: torch.Tensor
    ) -> None:
        """queries (B, S, d), docs (B, T, d), doc_mask (B, T): only each row's masked-in
        tokens are kept (padding and skiplisted tokens go; MaxSim ignores their order)."""
        mask = doc_mask.bool()
        self.queries.append(queries.float())
        self.docs.append(docs[mask].float())  # (tokens, d)
        self.doc_lengths.append(mask.sum(-1))

    def compute(self) -> torch.Tensor:
        from torchmetrics.utilities import dim_zero_cat

        queries = dim_zero_cat(self.queries)  # (N, S, d)
        flat, lengths = dim_zero_cat(self.docs), dim_zero_cat(self.doc_lengths)
        per_chunk = max(1, SCORE_BUDGET // (QUERY_CHUNK * queries.shape[1]))
        chunks = padded_chunks(flat, lengths, per_chunk)

        def score(part: torch.Tensor, _: Any) -> torch.Tensor:  # (c, N)
            return torch.cat([maxsim(part, docs, mask) for docs, mask in chunks], dim=1)

        return positive_ranks(queries, None, QUERY_CHUNK, score)


class CorpusMaxSimMetric(CorpusRetrievalMetric):
    """A retrieval ranking metric over the eval corpus, scored by MaxSim."""

    store_class = MaxSimEmbeddings


def gather_documents(
    docs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's document vectors and masks in rank order, and this rank's offset among
    them; gradients flow back to each rank's own part. Each rank pads its documents to the
    widest on any rank, agreed over the host (the widths are host-side shapes, so no device
    waits). One process: `docs` itself, offset 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return docs, mask, 0
    from flexbert.data.distributed import max_over_ranks

    pad = max_over_ranks(docs.shape[1]) - docs.shape[1]
    docs, mask = F.pad(docs, (0, 0, 0, pad)), F.pad(mask.to(torch.uint8), (0, pad))
    masks = [torch.empty_like(mask) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, mask)
    return (
        torch.cat(gather_with_grad(docs)),
        torch.cat(masks).bool(),
        dist.get_rank() * docs.shape[0],
    )


class ComposerFlexBertColBERT(ComposerFlexBertRetrieval):
    """Retrieval's training and evaluation with MaxSim: in-batch cross-entropy over MaxSim
    scores of (query, positive) pairs and hard negatives, with several ranks and
    `gather_negatives` against every rank's documents (`gather_documents`, as PyLate gathers
    them), or distillation of teacher scores over min-max scaled MaxSim scores (PyLate's
    `Distillation`); corpus-level ranking metrics on eval (`CorpusMaxSimMetric`)."""

    candidate_pool = staticmethod(gather_documents)
    corpus_metric = CorpusMaxSimMetric
    kind = "colbert"
    distill_normalize = True

    def own_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 1 + k) MaxSim scores of each query against its own positive and hard negatives
        (distillation): no (B, B x (1 + k)) in-batch score tensor is built."""
        queries = self.model.encode_queries(batch["input_ids"], batch["attention_mask"])
        docs, mask = self.model.encode_documents(*candidate_inputs(batch))
        b = queries.shape[0]
        return maxsim_per_query(queries, per_query(docs, b), per_query(mask, b))

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> ColBERTOutput:
        """Token vectors only: the corpus metrics score them; the in-batch (B, B, S, T) score
        tensor of the loss is not built (gigabytes at large eval batches)."""
        if outputs is not None:
            return outputs
        queries = self.model.encode_queries(batch["input_ids"], batch["attention_mask"])
        docs, mask = self.model.encode_documents(batch["cand_ids"], batch["cand_mask"])
        return ColBERTOutput(embeddings=queries, candidate_embeddings=docs, candidate_mask=mask)

    def update_metric(self, batch: dict[str, Any], outputs: ColBERTOutput, metric) -> None:
        metric.update(
            outputs.embeddings.detach(),
            outputs.candidate_embeddings.detach(),
            outputs.candidate_mask,
        )
