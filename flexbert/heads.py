"""Task heads on top of `FlexBertModel`, named like Hugging Face ModernBERT's modules.

Each head runs on the model's internal layout, so with unpadding the head and the decoder only
see real tokens (and with `sparse_prediction` only the tokens that carry a label).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexbert.components import POOLINGS
from flexbert.config import ModelConfig
from flexbert.layout import Layout, to_rows
from flexbert.model import (
    FlexBertModel,
    FlexBertPreTrainedModel,
    check_labels_shape,
    labels_to_internal,
    to_caller_layout,
)
from flexbert.outputs import FlexBertOutput
from flexbert.registry import ConfigError

IGNORE_INDEX = -100


class PredictionHead(nn.Module):
    """dense -> activation -> norm, shared by the MLM and classification heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.head_bias)
        self.act = cfg.build_activation(cfg.head_activation)
        self.norm = cfg.build_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


def pool(cfg: ModelConfig, hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, D) sequence vectors from hidden states in either layout."""
    if layout.padded:
        return POOLINGS.build(cfg.pooling, hidden, attention_mask=layout.attention_mask)
    return POOLINGS.build(cfg.pooling, hidden, cu_seqlens=layout.cu_seqlens)


class FlexBertForMaskedLM(FlexBertPreTrainedModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.model = FlexBertModel(cfg, initialize=False)
        self.head = PredictionHead(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight  # tied
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        label_positions: torch.Tensor | None = None,
    ) -> FlexBertOutput:
        """With `sparse_prediction` and labels, logits are (M, V) for the M labelled tokens
        in flattened order. `label_positions` (M,): where those tokens are in the flattened
        `labels`, as the data loaders hand them over; without it they are found here by a
        boolean index, which waits for the device (one host sync per step)."""
        hidden, layout = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        flat = hidden.flatten(0, -2) if layout.padded else hidden  # (N, D)
        if labels is not None and self.config.sparse_prediction:
            if label_positions is None:
                flat_labels = labels_to_internal(labels, layout)
                keep = (flat_labels != IGNORE_INDEX).nonzero().flatten()  # host sync
                targets = flat_labels.index_select(0, keep)
            else:
                check_labels_shape(labels, layout)
                targets = labels.flatten().index_select(0, label_positions)
                keep = layout.internal_positions(label_positions)
            logits = self.decoder(self.head(flat.index_select(0, keep)))  # (M, V)
            loss = F.cross_entropy(logits.float(), targets)
            return FlexBertOutput(
                loss=loss, logits=logits, last_hidden_state=to_caller_layout(hidden, layout)
            )
        logits = self.decoder(self.head(flat))  # (N, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float(), labels_to_internal(labels, layout), ignore_index=IGNORE_INDEX
            )
        if layout.padded:
            logits = logits.view(*hidden.shape[:-1], -1)
        return FlexBertOutput(
            loss=loss,
            logits=to_caller_layout(logits, layout),
            last_hidden_state=to_caller_layout(hidden, layout),
        )


class ClassifierModel(FlexBertPreTrainedModel):
    """Encoder + prediction head + dropout + linear classifier (ModernBERT's task heads)."""

    def __init__(self, cfg: ModelConfig, num_outputs: int) -> None:
        super().__init__(cfg)
        self.num_labels = cfg.num_labels
        self.model = FlexBertModel(cfg, initialize=False)
        self.head = PredictionHead(cfg)
        self.drop = nn.Dropout(cfg.head_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_outputs)
        self.init_weights()

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.head(x)))


class FlexBertForSequenceClassification(ClassifierModel):
    """Classification, regression or multi-label over a pooled sequence vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, cfg.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> FlexBertOutput:
        hidden, layout = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        pooled = pool(self.config, hidden, layout)  # (B, D)
        logits = self.classify(pooled)  # (B, C)
        loss = None if labels is None else sequence_loss(logits, labels, self.config)
        return FlexBertOutput(
            loss=loss, logits=logits, last_hidden_state=to_caller_layout(hidden, layout)
        )


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    problem = cfg.problem_type
    if problem is None:  # inferred like Hugging Face does
        if cfg.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return (
            F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            if cfg.num_labels == 1
            else F.mse_loss(logits.float(), labels.float())
        )
    if problem == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, cfg.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class FlexBertForTokenClassification(ClassifierModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, cfg.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> FlexBertOutput:
        hidden, layout = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        logits = self.classify(hidden)  # internal layout, (..., C)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, self.num_labels),
                labels_to_internal(labels, layout),
                ignore_index=IGNORE_INDEX,
            )
        return FlexBertOutput(
            loss=loss,
            logits=to_caller_layout(logits, layout),
            last_hidden_state=to_caller_layout(hidden, layout),
        )


class FlexBertForMultipleChoice(ClassifierModel):
    """input_ids (B, C, L): scores each of the C choices with a pooled vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> FlexBertOutput:
        batch, choices, seqlen = input_ids.shape
        flat_mask = None if attention_mask is None else attention_mask.view(-1, seqlen)
        hidden, layout = self.model.encode(input_ids.view(-1, seqlen), flat_mask)
        pooled = pool(self.config, hidden, layout)  # (B * C, D)
        logits = self.classify(pooled).view(batch, choices)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return FlexBertOutput(loss=loss, logits=logits)


class FlexBertForQuestionAnswering(ClassifierModel):
    """Extractive QA: a start and an end logit per token (SQuAD-style answer spans).

    `start_logits` / `end_logits` come as (num_seqs, L) rows (the caller's padded length, or
    max_seqlen for a packed batch) with the lowest float past each sequence's end, so padding
    is never an answer. Positions index tokens within their own sequence; a position outside
    the row (e.g. L for "no answer here") is ignored by the loss, as in Hugging Face."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.num_labels != 2:
            raise ConfigError(
                f"num_labels: question answering predicts a start and an end logit, so "
                f"num_labels must be 2, got {cfg.num_labels}"
            )
        super().__init__(cfg, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> FlexBertOutput:
        hidden, layout = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        logits = self.classify(hidden)  # internal layout, (..., 2)
        rows = to_rows(logits, layout, fill=torch.finfo(logits.dtype).min)  # (B, L, 2)
        start_logits, end_logits = rows.unbind(dim=-1)  # (B, L) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (
                span_loss(start_logits, start_positions) + span_loss(end_logits, end_positions)
            ) / 2
        return FlexBertOutput(
            loss=loss,
            logits=rows,
            start_logits=start_logits,
            end_logits=end_logits,
            last_hidden_state=to_caller_layout(hidden, layout),
        )


def span_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, L) position logits; positions >= L are ignored and negative ones
    clamp to 0 (the [CLS] slot, "no answer"), as in Hugging Face."""
    outside = logits.shape[1]
    positions = positions.view(-1).clamp(0, outside)
    return F.cross_entropy(logits.float(), positions, ignore_index=outside)


class FlexBertForSentenceEmbedding(FlexBertPreTrainedModel):
    """Pooled (cls or mean) and L2-normalised sentence vectors for retrieval.

    With `labels` given as the index of each query's positive among `candidates`, the loss is
    the in-batch InfoNCE loss at `temperature`.
    """

    POOLING_FROM_SENTENCE_TRANSFORMERS = True  # from_hf on an ST directory pools like it

    def __init__(self, cfg: ModelConfig, temperature: float = 0.05) -> None:
        super().__init__(cfg)
        self.model = FlexBertModel(cfg, initialize=False)
        self.temperature = temperature
        self.init_weights()

    def init_kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def save_hf(self, path: str | Path) -> Path:
        """The encoder as a ModernBertModel directory (`AutoModel`) plus the
        sentence-transformers module files: with the tokenizer saved there too
        (`tokenizer.save_pretrained(path)`), `SentenceTransformer(path)` gives these vectors."""
        from flexbert import hf_sentence_transformers as st

        st.sentence_transformers_pooling(self.config)  # refuse before writing anything
        return st.write_sentence_transformers_modules(self.model.save_hf(path), self.config)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        hidden, layout = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        return F.normalize(pool(self.config, hidden, layout).float(), dim=-1)  # (B, D)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        candidates: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        labels: torch.Tensor | None = None,
        candidate_pool: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
    ) -> FlexBertOutput:
        """`candidate_pool` widens the negatives: it maps this batch's candidate embeddings to
        the pool scored against and this batch's offset in it (e.g. every rank's candidates;
        default: this batch alone). Labels then default to each query's own positive."""
        emb = self.embed(input_ids, attention_mask)
        loss = logits = own = None
        if candidates is not None:
            cand = own = self.embed(*candidates)  # (B, D) this batch's candidates
            offset = 0
            if candidate_pool is not None:
                cand, offset = candidate_pool(cand)
            logits = emb @ cand.T / self.temperature  # (B, N)
            if labels is None:
                labels = torch.arange(emb.shape[0], device=emb.device) + offset
            loss = F.cross_entropy(logits, labels)
        return FlexBertOutput(loss=loss, logits=logits, embeddings=emb, candidate_embeddings=own)
