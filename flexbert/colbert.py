"""ColBERT-style multi-vector (late-interaction) retrieval on top of `FlexBertModel`: one
normalised vector per token, MaxSim scores, [MASK] query augmentation, optional query and
document marker tokens and a document skiplist; saved as a Hugging Face ModernBertModel
directory plus the projection and its settings."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexbert.attention.backends import runs_padded
from flexbert.colbert_settings import (
    COLBERT_SETTINGS_FILE,
    COLBERT_WEIGHTS_FILE,
    MARKER_KEYS,
    SAVED_BEFORE,
    check_colbert_settings,
    read_saved_head,
    settings_of,
)
from flexbert.config import ModelConfig
from flexbert.layout import positions_from_cu_seqlens, seq_ids_from_cu_seqlens, to_rows
from flexbert.model import FlexBertModel, FlexBertPreTrainedModel
from flexbert.outputs import FlexBertOutput
from flexbert.registry import ConfigError


@dataclass
class ColBERTOutput(FlexBertOutput):
    """`embeddings` (B, query_length, colbert_dim): the query token vectors (every one
    scores); `candidate_embeddings` (B, L, colbert_dim): the documents' token vectors, zero
    past each document's end, where `candidate_mask` (B, L) is False."""

    candidate_mask: torch.Tensor | None = None


def insert_marker(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    marker: int | None = None,
) -> tuple[Any, ...]:
    """The same batch with the token `marker` after each sequence's first token ([CLS]), as
    ColBERT marks queries ([Q]) and documents ([D]); unchanged for marker None. Padded (B, L)
    ids (and mask; padding on the right) give (B, L + 1); packed ids (T,) with cu_seqlens give
    (T + B,), their offsets moved and max_seqlen + 1."""
    if marker is None:
        return input_ids, attention_mask, cu_seqlens, max_seqlen
    if cu_seqlens is None:
        column = torch.full_like(input_ids[:, :1], marker)
        ids = torch.cat([input_ids[:, :1], column, input_ids[:, 1:]], dim=1)
        if attention_mask is not None:  # the marker is real where the row's first token is
            first = attention_mask[:, :1]
            attention_mask = torch.cat([first, first, attention_mask[:, 1:]], dim=1)
        return ids, attention_mask, None, max_seqlen
    starts = cu_seqlens[:-1].long()  # (B,) each sequence's first token
    token = torch.arange(input_ids.shape[0], device=input_ids.device)
    seq = torch.bucketize(token, starts, right=True) - 1  # each token's sequence
    # a token moves by one per earlier sequence's marker, and by its own one past [CLS]
    moved = token + seq + (token != starts[seq]).long()
    ids = input_ids.new_full((input_ids.shape[0] + starts.shape[0],), marker)
    ids[moved] = input_ids  # the positions left hold the markers
    steps = torch.arange(cu_seqlens.shape[0], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    shifted = cu_seqlens + steps
    return ids, None, shifted, None if max_seqlen is None else max_seqlen + 1


def maxsim(
    queries: torch.Tensor, docs: torch.Tensor, doc_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ColBERT's late interaction: (A, S, d) query and (N, T, d) document token vectors ->
    (A, N) scores. For each query token the best dot product over the document's tokens
    (positions where `doc_mask` (N, T) is False never count), summed over the query tokens."""
    sim = torch.einsum("asd,ntd->anst", queries, docs)  # (A, N, S, T)
    if doc_mask is not None:
        sim = sim.masked_fill(~doc_mask.bool()[None, :, None, :], float("-inf"))
    return sim.amax(dim=-1).sum(dim=-1)  # (A, N)


def maxsim_per_query(
    queries: torch.Tensor, docs: torch.Tensor, doc_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MaxSim of each query against its own documents only: (B, S, d) queries and (B, n, T, d)
    documents (mask (B, n, T)) -> (B, n) scores, as `maxsim` would give for those pairs."""
    sim = torch.einsum("bsd,bntd->bnst", queries, docs)  # (B, n, S, T)
    if doc_mask is not None:
        sim = sim.masked_fill(~doc_mask.bool()[:, :, None, :], float("-inf"))
    return sim.amax(dim=-1).sum(dim=-1)


class FlexBertForColBERT(FlexBertPreTrainedModel):
    """Multi-vector (late-interaction) retrieval as ColBERT does it: the encoder, a bias-free
    projection hidden_size -> `colbert_dim` and one L2-normalised vector per token. A query
    and a document score by MaxSim (`maxsim`): each query token's best dot product over the
    document's tokens, summed over the query tokens. Document padding never scores.

    Queries are augmented as ColBERT does: cut or padded to `query_length` tokens with
    [MASK] (`mask_token_id`), and every [MASK] vector scores. By default the query also
    attends to its [MASK] tokens (PyLate's `attend_to_expansion_tokens=True`, the unpadded
    layout's fast path); `attend_to_expansion_tokens=False`, ColBERT's and PyLate's default,
    hides them from every token while each is still computed, attending the real ones (the
    queries then run in the padded layout: `FlexBertModel.encode(keep_padding=True)`). With `query_marker_id` / `document_marker_id`, that token
    follows [CLS] in every query / document (`insert_marker`), as ColBERT's and PyLate's [Q]
    and [D] markers do (the marker counts in query_length). Document tokens whose ids are in
    `skiplist_ids` (PyLate: punctuation) are left out of MaxSim, as PyLate does.

    With `candidates` (documents) the loss is in-batch cross-entropy over the MaxSim scores,
    without a temperature, as ColBERT and PyLate (`losses.Contrastive`, temperature 1.0)
    train: `labels` is the index of each query's positive among the candidates (default:
    candidate i for query i).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        colbert_dim: int = 128,
        query_length: int = 32,
        query_marker_id: int | None = None,
        document_marker_id: int | None = None,
        skiplist_ids: Sequence[int] | None = None,
        attend_to_expansion_tokens: bool = True,
    ) -> None:
        super().__init__(cfg)
        check_colbert_settings(colbert_dim, query_length)
        if not isinstance(attend_to_expansion_tokens, bool):
            raise ConfigError(
                f"attend_to_expansion_tokens: true or false, got {attend_to_expansion_tokens!r}"
            )
        if not attend_to_expansion_tokens and not runs_padded(cfg):
            raise ConfigError(
                f"attend_to_expansion_tokens=false runs queries in the padded layout, which "
                f"backend {cfg.backend.name!r} cannot: use backend 'auto' (sdpa for them on a GPU), "
                "'sdpa', 'eager' or 'flex'"
            )
        for name, value in zip(MARKER_KEYS, (query_marker_id, document_marker_id)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value < cfg.vocab_size
            ):
                raise ConfigError(
                    f"{name}: a token id in [0, {cfg.vocab_size}) or None, got {value!r}"
                )
        if query_marker_id is not None and query_length < 2:
            raise ConfigError("query_length: at least 2 with a query marker ([CLS] and the marker)")
        self.colbert_dim, self.query_length = colbert_dim, query_length
        self.query_marker_id, self.document_marker_id = query_marker_id, document_marker_id
        if skiplist_ids is not None:
            bad = [i for i in skiplist_ids if not isinstance(i, int) or not 0 <= i < cfg.vocab_size]
            if bad:
                raise ConfigError(f"skiplist_ids: token ids in [0, {cfg.vocab_size}), got {bad}")
            skiplist_ids = sorted(set(skiplist_ids))
        self.skiplist_ids: list[int] | None = skiplist_ids
        self.attend_to_expansion_tokens = attend_to_expansion_tokens
        self.model = FlexBertModel(cfg, initialize=False)
        self.projection = nn.Linear(cfg.hidden_size, colbert_dim, bias=False)
        self.init_weights()

    def init_kwargs(self) -> dict[str, Any]:
        return self.get_extra_state()  # the constructor's settings, by the same names

    # The settings travel in the state dict (Composer checkpoints), as `_extra_state`.
    def get_extra_state(self) -> dict[str, int | None]:
        return {
            "colbert_dim": self.colbert_dim,
            "query_length": self.query_length,
            "query_marker_id": self.query_marker_id,
            "document_marker_id": self.document_marker_id,
            "skiplist_ids": self.skiplist_ids,
            "attend_to_expansion_tokens": self.attend_to_expansion_tokens,
        }

    def set_extra_state(self, state: dict[str, int | None]) -> None:
        state = {**SAVED_BEFORE, **state}  # what saves from before a setting existed mean
        if dict(state) != self.get_extra_state():
            raise ConfigError(
                f"these weights were trained with ColBERT settings {dict(state)}, this model "
                f"has {self.get_extra_state()}; build it with those (settings_from_state_dict)"
            )

    @staticmethod
    def settings_from_state_dict(state: dict[str, Any]) -> dict[str, int | None]:
        """colbert_dim, query_length, marker ids and skiplist of a FlexBertForColBERT state dict."""
        saved = state.get("_extra_state")
        if isinstance(saved, dict):
            return settings_of(saved)
        return {"colbert_dim": int(state["projection.weight"].shape[0])}

    # ------------------------------------------------------------------ encoding
    def augment_queries(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) query ids -> (B, query_length) ids (the query marker after [CLS], when
        set) where padding and the positions up to query_length are [MASK], and the mask of
        what is attended: all ones, or without attend_to_expansion_tokens only the real
        tokens (every position scores either way)."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"query input_ids must be (batch, seq_len), got {tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        input_ids, attention_mask, _, _ = insert_marker(
            input_ids, attention_mask, marker=self.query_marker_id
        )
        width, limit = input_ids.shape[1], self.query_length
        keep = attention_mask.bool()
        if width > limit and bool(keep[:, limit:].any()):  # host sync only for long queries
            room = limit - (self.query_marker_id is not None)
            raise ValueError(
                f"a query has more than query_length={limit} tokens; tokenize queries with "
                f"max_length={room} (or build the model with a larger query_length)"
            )
        ids = torch.where(keep[:, :limit], input_ids[:, :limit], self.config.mask_token_id)
        ids = F.pad(ids, (0, limit - ids.shape[1]), value=self.config.mask_token_id)
        if self.attend_to_expansion_tokens:
            return ids, torch.ones_like(ids)  # (B, query_length) each
        real = keep[:, :limit]
        return ids, F.pad(real, (0, limit - real.shape[1]), value=False)

    def token_vectors(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_seqs, L, colbert_dim) normalised token vectors, zero past each sequence's
        end, and the (num_seqs, L) mask of real tokens; in either layout (L: the caller's
        padded length, or max_seqlen for a packed batch)."""
        hidden, layout = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        vectors = F.normalize(self.projection(hidden).float(), dim=-1)  # internal layout
        real = torch.ones(vectors.shape[:-1], dtype=torch.bool, device=vectors.device)
        return to_rows(vectors, layout), to_rows(real, layout, fill=False)

    def encode_queries(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, query_length, colbert_dim) query token vectors (augmented with [MASK])."""
        ids, mask = self.augment_queries(input_ids, attention_mask)
        if self.attend_to_expansion_tokens:
            return self.token_vectors(ids, mask)[0]
        # [MASK]s no token attends to, each still computed (attending the real tokens)
        hidden, _ = self.model.encode(ids, mask, keep_padding=True)  # (B, query_length, D)
        return F.normalize(self.projection(hidden).float(), dim=-1)

    def encode_documents(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, colbert_dim) document token vectors and their (B, L) mask, in either layout,
        the document marker after [CLS] when set (L then counts it); skiplisted tokens are
        out of the mask (and their vectors zero)."""
        marked = insert_marker(
            input_ids, attention_mask, cu_seqlens, max_seqlen, self.document_marker_id
        )
        longest = marked[3] if cu_seqlens is not None else marked[0].shape[1]
        if self.document_marker_id is not None and longest and longest > self.config.max_seq_len:
            raise ValueError(
                f"a document of {longest - 1} tokens and its marker exceed max_seq_len="
                f"{self.config.max_seq_len}: tokenize documents with max_length="
                f"{self.config.max_seq_len - 1}"
            )
        vectors, mask = self.token_vectors(*marked)
        if self.skiplist_ids is None:
            return vectors, mask
        skipped = self.skipped(marked[0], marked[2], mask.shape[1])
        keep = mask & ~skipped
        return vectors * keep[..., None], keep

    def skipped(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, width: int
    ) -> torch.Tensor:
        """(B, width) True where a document token's id is in the skiplist: padded (B, L) ids
        as they are, packed (T,) ids laid out in rows by cu_seqlens (no host sync)."""
        listed = torch.tensor(self.skiplist_ids, device=input_ids.device, dtype=input_ids.dtype)
        hit = torch.isin(input_ids, listed)
        if cu_seqlens is None:
            return hit
        total = input_ids.shape[0]
        rows = hit.new_zeros((cu_seqlens.shape[0] - 1, width))
        rows[
            seq_ids_from_cu_seqlens(cu_seqlens, total), positions_from_cu_seqlens(cu_seqlens, total)
        ] = hit
        return rows

    def score(
        self,
        queries: tuple[torch.Tensor, torch.Tensor | None],
        documents: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """(A, N) MaxSim scores of queries (ids, mask) against documents (ids, mask) or a
        packed batch (ids, None, cu_seqlens, max_seqlen)."""
        return maxsim(self.encode_queries(*queries), *self.encode_documents(*documents))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        candidates: tuple[torch.Tensor, ...] | None = None,
        labels: torch.Tensor | None = None,
        candidate_pool: Callable[..., tuple[torch.Tensor, torch.Tensor, int]] | None = None,
    ) -> ColBERTOutput:
        """`input_ids` are queries; `candidates` documents as (ids, mask) or a packed batch
        (ids, None, cu_seqlens, max_seqlen). Logits: (B, N) MaxSim scores. `candidate_pool`
        widens the negatives: it maps this batch's document vectors and mask to the pool
        scored against and this batch's offset in it (e.g. every rank's documents)."""
        queries = self.encode_queries(input_ids, attention_mask)
        if candidates is None:
            return ColBERTOutput(embeddings=queries)
        docs, doc_mask = self.encode_documents(*candidates)
        pool, pool_mask, offset = (docs, doc_mask, 0)
        if candidate_pool is not None:
            pool, pool_mask, offset = candidate_pool(docs, doc_mask)
        logits = maxsim(queries, pool, pool_mask)  # (B, N)
        if labels is None:
            labels = torch.arange(queries.shape[0], device=queries.device) + offset
        loss = F.cross_entropy(logits, labels)
        return ColBERTOutput(
            loss=loss,
            logits=logits,
            embeddings=queries,
            candidate_embeddings=docs,
            candidate_mask=doc_mask,
        )

    # ------------------------------------------------------------------ saving
    def save_hf(self, path: str | Path) -> Path:
        """The encoder as a Hugging Face ModernBertModel directory (`AutoModel` loads the
        encoder alone), plus the projection (colbert_projection.safetensors) and the ColBERT
        settings (colbert_config.json): `FlexBertForColBERT.from_pretrained(path)`."""
        from safetensors.torch import save_file

        out = Path(self.model.save_hf(path))  # refuses (ConfigError) before writing
        weight = self.projection.weight.detach().contiguous().cpu()
        save_file({"weight": weight}, str(out / COLBERT_WEIGHTS_FILE), metadata={"format": "pt"})
        settings = {
            "architecture": type(self).__name__,
            **self.get_extra_state(),
            "mask_token_id": self.config.mask_token_id,
            "score": "maxsim",
            "query_augmentation": "mask",
        }
        (out / COLBERT_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return out

    @classmethod
    def from_encoder(
        cls, encoder: FlexBertModel, colbert_dim: int = 128, query_length: int = 32, **settings: Any
    ) -> FlexBertForColBERT:
        """A new ColBERT head (a fresh projection) on a copy of `encoder`'s weights;
        `settings`: query_marker_id, document_marker_id, skiplist_ids."""
        model = cls(encoder.config, colbert_dim, query_length, **settings)
        model.model.load_state_dict(encoder.state_dict())
        return model

    @classmethod
    def from_hf(
        cls,
        path: str | Path,
        colbert_dim: int | None = None,
        query_length: int | None = None,
        query_marker_id: int | None = None,
        document_marker_id: int | None = None,
        skiplist_ids: Sequence[int] | None = None,
        attend_to_expansion_tokens: bool | None = None,
        **overrides: Any,
    ) -> FlexBertForColBERT:
        """The encoder of a Hugging Face ModernBERT directory or Hub id (any head: MLM,
        sentence embedding...) with a fresh projection; a ColBERT model's directory (one that
        `save_hf` wrote, or a PyLate / sentence-transformers MultiVectorEncoder model) also
        gives back its projection and settings (the settings given may then only repeat
        them). `overrides` are ModelConfig fields."""
        from flexbert.hf import resolve_model_dir

        folder = resolve_model_dir(path)
        head = read_saved_head(folder)
        saved = None if head is None else head["settings"]
        given = {
            "colbert_dim": colbert_dim,
            "query_length": query_length,
            "query_marker_id": query_marker_id,
            "document_marker_id": document_marker_id,
            "skiplist_ids": skiplist_ids,
            "attend_to_expansion_tokens": attend_to_expansion_tokens,
        }
        if skiplist_ids is not None:  # a set: compared in the order it is saved
            given["skiplist_ids"] = sorted(set(skiplist_ids))
        if saved is not None:
            differ = {k: v for k, v in given.items() if v is not None and v != saved[k]}
            if differ:
                raise ConfigError(
                    f"{folder} holds a ColBERT head with {saved}; {differ} do not fit it "
                    "(leave them unset, or start from the encoder of another directory)"
                )
            return cls.from_saved_head(folder, head, **overrides)
        settings = {k: v for k, v in given.items() if v is not None}
        return cls.from_encoder(FlexBertModel.from_hf(folder, **overrides), **settings)

    @classmethod
    def from_saved_head(
        cls, folder: Path, head: dict[str, Any], **overrides: Any
    ) -> FlexBertForColBERT:
        """The encoder in `folder` under the ColBERT head that `read_saved_head(folder)` read
        there (its settings and projection); `overrides` are ModelConfig fields."""
        model = cls.from_encoder(FlexBertModel.from_hf(folder, **overrides), **head["settings"])
        model.projection.weight.data.copy_(head["weight"])
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> FlexBertForColBERT:
        """A directory that `save_hf` wrote (a colbert fine-tuning run's `hf/`), or a PyLate
        or sentence-transformers MultiVectorEncoder model on a ModernBERT encoder: encoder,
        projection and settings, scoring exactly as the saved model did; or its Hub id."""
        from flexbert.hf import resolve_model_dir

        folder = resolve_model_dir(path)
        head = read_saved_head(folder)
        if head is None:
            raise FileNotFoundError(
                f"{folder} is not a saved ColBERT model: no {COLBERT_SETTINGS_FILE} and "
                f"{COLBERT_WEIGHTS_FILE} (FlexBERT's), nor a PyLate / sentence-transformers "
                "multi-vector model's modules.json and 1_Dense; FlexBertForColBERT.from_hf(path) "
                "puts a new projection on any ModernBERT encoder"
            )
        return cls.from_saved_head(folder, head, **overrides)
