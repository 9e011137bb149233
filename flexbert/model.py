"""The FlexBERT encoder, top to bottom.

input ids -> [unpad once] -> token embedding (+ absolute positions) -> norm -> dropout
          -> N x [x + Attn(PreNorm(x)); x + MLP(PreNorm(x))] -> final norm -> [repad once]

With `padding="unpadded"` every layer works on (T, D) real tokens; a padded batch is unpadded
at the entry and restored at the exit, and a packed batch passes `cu_seqlens`/`max_seqlen`.
With `padding="padded"` every layer sees (B, L, D) plus a mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexbert.attention import Attention
from flexbert.attention.backends import runs_padded
from flexbert.components import INITS, MLPS, POSITIONS
from flexbert.config import ModelConfig
from flexbert.hf_interop import HFInteropMixin
from flexbert.layout import (
    Layout,
    can_read_values,
    check_cu_seqlens,
    positions_from_cu_seqlens,
    repad,
    unpad,
)
from flexbert.outputs import FlexBertOutput
from flexbert.registry import ConfigError

# Dynamo's recompile limit while layers are compiled: see FlexBertPreTrainedModel.compile_layers.
COMPILED_LAYER_VARIANTS = 32


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.norm = cfg.build_norm() if cfg.embedding_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.embedding_dropout)

    def forward(
        self, input_ids: torch.Tensor, position: nn.Module, positions: torch.Tensor
    ) -> torch.Tensor:
        hidden = position.embed(self.tok_embeddings(input_ids), positions)  # (..., D)
        return self.drop(self.norm(hidden))


class FlexBertLayer(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        skip = layer_idx == 0 and cfg.skip_first_prenorm
        self.attn_norm = nn.Identity() if skip else cfg.build_norm()
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = cfg.build_norm()
        self.mlp = MLPS.build(cfg.mlp, cfg)
        self.layer_type = cfg.layer_types[layer_idx]
        self.checkpointing = False  # FlexBertPreTrainedModel.set_activation_checkpointing

    def forward(self, x: torch.Tensor, layout: Layout, rotary) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():  # inside: compiles with the layer
            return checkpoint(self.block, x, layout, rotary, use_reentrant=False)
        return self.block(x, layout, rotary)

    def block(self, x: torch.Tensor, layout: Layout, rotary) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layout, rotary)
        return x + self.mlp(self.mlp_norm(x))


class FlexBertPreTrainedModel(HFInteropMixin, nn.Module):
    """Shared construction: keeps the config and applies the configured init scheme."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"expected a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg

    def init_weights(self) -> None:
        INITS.build(self.config.init, self, self.config)

    def init_kwargs(self) -> dict[str, Any]:
        """What builds this model again besides its config: `type(m)(m.config,
        **m.init_kwargs())` is a new model of the same shape and settings (what a gathered
        FSDP state dict is loaded into for export)."""
        return {}

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile every encoder layer in place (fuses norms, RoPE, GLU around the
        attention kernel). Layers share code, so they share compiled graphs; the entry
        (unpadding, masks) stays eager where data-dependent shapes would break a graph."""
        encoder = self if isinstance(self, FlexBertModel) else self.model
        # One layer's code compiles into a graph per (layer kind: first/global/local) x (mask
        # cache state) x (padding or not) x (chunked window or not): up to 24. Dynamo's default
        # limit of 8 would silently leave every layer eager after two kinds of batch.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_LAYER_VARIANTS)
        for layer in encoder.layers:
            layer.compile(**compile_kwargs)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder layer's activations in the backward pass instead of keeping
        them (memory ~ one layer's activations instead of all of them, for about one more
        forward's compute): what long-context training of large models needs. The recompute
        replays dropout with the same random numbers, so gradients are unchanged."""
        encoder = self if isinstance(self, FlexBertModel) else self.model
        for layer in encoder.layers:
            layer.checkpointing = enabled

    # Composer's FSDP reads these two on the wrapped model: one FSDP unit, and with
    # `activation_checkpointing: true` in its FSDP config one checkpoint, per encoder layer.
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, FlexBertLayer)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, FlexBertLayer)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n


class FlexBertModel(FlexBertPreTrainedModel):
    def __init__(self, cfg: ModelConfig, initialize: bool = True) -> None:
        super().__init__(cfg)
        self.embeddings = Embeddings(cfg)
        self.position = POSITIONS.build(cfg.position, cfg)
        self.layers = nn.ModuleList(FlexBertLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = cfg.build_norm() if cfg.final_norm else nn.Identity()
        if initialize:  # task heads initialise once, after adding their own layers
            self.init_weights()

    # -------------------------------------------------------------------- layout
    def make_layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        keep_padding: bool = False,
    ) -> tuple[torch.Tensor, Layout]:
        """Return the ids in the model's internal layout and the Layout describing them
        (`keep_padding`: the padded layout whatever config.padding says, see `encode`)."""
        limit = self.config.max_seq_len
        if cu_seqlens is not None:  # packed batch: already unpadded
            if input_ids.dim() != 1:
                raise ValueError(
                    f"with cu_seqlens, input_ids must be 1-D (T,), got {tuple(input_ids.shape)}"
                )
            if self.config.padding != "unpadded":
                raise ConfigError("packed input (cu_seqlens) needs padding='unpadded'")
            if attention_mask is not None:
                raise ValueError(
                    "pass either attention_mask (a padded batch) or cu_seqlens (a packed one), "
                    "not both"
                )
            check_cu_seqlens(cu_seqlens, input_ids.shape[0], max_seqlen)
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
            if max_seqlen > limit:
                raise ValueError(
                    f"max_seqlen={max_seqlen} (the longest packed sequence) exceeds "
                    f"max_seq_len={limit}: split or truncate sequences to {limit} tokens"
                )
            cu_seqlens = cu_seqlens.to(input_ids.device, torch.int32)
            positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0])
            return input_ids, Layout(False, positions, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, seq_len), or 1-D with cu_seqlens; got {tuple(input_ids.shape)}"
            )
        batch, seqlen = input_ids.shape
        if seqlen > limit:
            raise ValueError(
                f"sequence length {seqlen} (the padded batch's width) exceeds "
                f"max_seq_len={limit}: truncate or pad to at most {limit} tokens"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        attention_mask = check_attention_mask(attention_mask)
        # (1, L): RoPE's cos/sin are computed once and broadcast over the rows
        positions = torch.arange(seqlen, device=input_ids.device)[None]
        if self.config.padding == "padded" or keep_padding:
            has_padding = not bool(attention_mask.all())  # one host sync per forward
            return input_ids, Layout(
                True, positions, attention_mask=attention_mask, has_padding=has_padding
            )
        indices, cu, max_len = unpad(attention_mask)
        layout = Layout(
            False,
            positions.expand(batch, seqlen).flatten().index_select(0, indices),
            cu_seqlens=cu,
            max_seqlen=max_len,
            indices=indices,
            batch_shape=(batch, seqlen),
        )
        return input_ids.flatten().index_select(0, indices), layout

    # -------------------------------------------------------------------- forward
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        keep_padding: bool = False,
    ) -> tuple[torch.Tensor, Layout]:
        """Hidden states in the internal layout ((T, D) or (B, L, D)) and their Layout.

        `keep_padding=True` computes padded (B, L) inputs in the padded layout, every position
        included: a masked position is no key for any query, but its own output is what it
        attends to (the real tokens in its window), as Hugging Face's padded attention gives
        it; ColBERT's unattended [MASK] expansion tokens are such positions. It needs a
        backend that runs padded batches (auto, sdpa, eager, flex)."""
        if keep_padding and not runs_padded(self.config):
            raise ValueError(
                f"keep_padding needs the padded layout, which backend "
                f"{self.config.backend.name!r} cannot run: "
                "use backend 'auto', 'sdpa', 'eager' or 'flex'"
            )
        if keep_padding and cu_seqlens is not None:
            raise ValueError("keep_padding is for padded (B, L) inputs; a packed batch has none")
        ids, layout = self.make_layout(
            input_ids, attention_mask, cu_seqlens, max_seqlen, keep_padding
        )
        check_token_ids(ids, self.config.vocab_size)
        hidden = self.embeddings(ids, self.position, layout.positions)
        rotary = self.position.rotary(layout.positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, layout, None if rotary is None else rotary[layer.layer_type])
        return self.final_norm(hidden), layout

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> FlexBertOutput:
        hidden, layout = self.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        return FlexBertOutput(last_hidden_state=to_caller_layout(hidden, layout))


def check_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """The (B, L) mask as bool: 1/True for real tokens, 0/False for padding. A Hugging Face
    style additive mask (0 keep, -inf pad) would silently invert, so other values are refused
    (read only where that costs no host sync, as the id check)."""
    if mask.dtype != torch.bool and can_read_values(mask) and mask.numel():
        low, high = torch.stack(torch.aminmax(mask.float())).tolist()
        if low < 0 or high > 1 or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                "attention_mask must be 1 for real tokens and 0 for padding (bool or 0/1), "
                f"got values from {low} to {high}: an additive mask (0 keep, -inf pad) is "
                "not one"
            )
    return mask.bool()


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids outside the embedding table fail here, naming the valid range, instead of
    as a bare IndexError (or, on CUDA, a device-side assert). Reading the values would make
    the host wait for a GPU, so only CPU tensors outside torch.compile are checked."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {ids.dtype}")
    if not can_read_values(ids) or ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # host memory: no sync on the CPU
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids must be token ids in [0, vocab_size={vocab_size}); "
            f"got ids from {low} to {high}"
        )


def to_caller_layout(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Internal per-token values -> the layout the caller passed (repad a padded batch)."""
    return repad(x, layout) if layout.indices is not None else x


def check_labels_shape(labels: torch.Tensor, layout: Layout) -> None:
    """Per-token labels must have the shape of input_ids: (B, L) for a padded batch, (T,) for
    a packed one (shapes only, no host sync). A shifted or differently padded label tensor
    would otherwise be gathered onto the wrong tokens in the unpadded layout."""
    if layout.batch_shape is not None:
        expected = layout.batch_shape
    elif layout.padded:
        expected = tuple(layout.attention_mask.shape)
    else:
        expected = (layout.positions.shape[0],)
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(expected)} (one label per token, "
            f"-100 where there is none), got {tuple(labels.shape)}"
        )


def labels_to_internal(labels: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per-token labels in the caller's layout -> flat, aligned with internal tokens."""
    check_labels_shape(labels, layout)
    if layout.indices is not None:
        return labels.flatten().index_select(0, layout.indices)
    return labels.flatten()
