"""Model builders for the benchmark: FlexBERT, Hugging Face ModernBERT and BERT.

Every model gets random weights built from a config (nothing is downloaded). The Hugging Face
ModernBERT config is derived from the FlexBERT preset through `flexbert.hf.config_to_hf`, so
both sides have exactly the same architecture. transformers is imported inside functions: when
it is missing the Hugging Face rows are skipped with a note.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import flexbert
from flexbert.attention.backends import flash_attn_available, varlen_available

FAMILIES = ("flexbert", "hf-modernbert", "bert")
BERT_SIZES = {  # BertConfig keyword overrides per size; "base" is BertConfig()'s default
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        pad_token_id=0,
    ),
    "base": {},
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}
BERT_MAX_LEN = 512
# "<backend>+<tag>+..." options of a FlexBERT row, one GPU lever each, measured one at a time.
VARIANT_TAGS = {
    "compile": "torch.compile of the layer stack",
    "bf16rope": "RoPE applied in the activations' dtype instead of fp32",
    "cudagraph": "CUDA graphs: each batch shape's forward captured once, then replayed",
}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: family, size, attention backend and its `VARIANT_TAGS`."""

    family: str  # flexbert | hf-modernbert | bert
    size: str  # tiny | base | large
    backend: str  # FlexBERT backend name, or the transformers attn_implementation
    compile: bool = False
    bf16_rope: bool = False  # FlexBERT only
    cuda_graph: bool = False  # FlexBERT inference on CUDA only

    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}"

    @property
    def variant(self) -> str:
        options = (
            ("compile", self.compile),
            ("bf16rope", self.bf16_rope),
            ("cudagraph", self.cuda_graph),
        )
        return "+".join([self.backend, *(tag for tag, on in options if on)])

    @property
    def plain(self) -> bool:
        """No compile and no CUDA graphs: the rows the max-batch search runs on."""
        return not (self.compile or self.cuda_graph)

    @classmethod
    def parse(cls, family: str, size: str, variant: str) -> ModelSpec:
        """`varlen+compile+bf16rope` -> the spec with those options."""
        backend, *tags = variant.split("+")
        unknown = [t for t in tags if t not in VARIANT_TAGS]
        if unknown:
            raise ValueError(
                f"unknown variant option(s) {unknown} in '{variant}'; valid: {sorted(VARIANT_TAGS)}"
            )
        return cls(
            family, size, backend, "compile" in tags, "bf16rope" in tags, "cudagraph" in tags
        )

    @property
    def layout(self) -> str:
        """FlexBERT consumes packed documents; the Hugging Face models padded batches."""
        return "packed" if self.family == "flexbert" else "padded"


def transformers_version() -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    return transformers.__version__


def flexbert_backends(device: str) -> list[str]:
    """Backends worth timing on this device, fastest first."""
    if device.startswith("cuda"):
        fast = ["varlen"] if varlen_available(local=True) else []
        return fast + (["flash_attn"] if flash_attn_available() else []) + ["sdpa"]
    return ["sdpa"]


def hf_backends(device: str) -> list[str]:
    fa2 = device.startswith("cuda") and flash_attn_available()
    return ["sdpa"] + (["flash_attention_2"] if fa2 else [])


def flexbert_config(size: str, backend: str = "sdpa", **overrides: Any) -> flexbert.ModelConfig:
    return flexbert.ModelConfig.preset(size, backend=backend, **overrides)


def hf_modernbert_config(size: str, **overrides: Any) -> Any:
    """transformers ModernBertConfig with the same architecture as FlexBERT's preset."""
    from flexbert.hf import config_to_hf

    cfg = config_to_hf(flexbert_config(size), "ModernBertModel")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def bert_config(size: str, max_len: int = BERT_MAX_LEN) -> Any:
    from transformers import BertConfig

    return BertConfig(**{**BERT_SIZES[size], "max_position_embeddings": max(max_len, 512)})


def max_len(spec: ModelSpec) -> int:
    """Longest sequence the model can take (BERT's learned positions stop at 512)."""
    if spec.family == "bert":
        return BERT_MAX_LEN
    return flexbert.ModelConfig.preset(spec.size).max_seq_len


def special_ids(spec: ModelSpec) -> dict[str, int]:
    """pad and mask ids: FlexBERT and HF ModernBERT share the FlexBERT preset's ids."""
    if spec.family == "bert":
        return {"pad": 0, "mask": 4 if spec.size == "tiny" else 103}
    cfg = flexbert.ModelConfig.preset(spec.size)
    return {"pad": cfg.pad_token_id, "mask": cfg.mask_token_id}


def id_range(sizes: list[str]) -> tuple[int, int]:
    """Random token ids valid for every model and clear of all special ids.

    Tiny vocabularies have their specials at 0-4; BERT's real vocab at 0-103 and ModernBERT's
    at 50280+, so [1000, 30000) is ordinary text for both.
    """
    return (5, 512) if "tiny" in sizes else (1000, 30000)


def build_model(
    spec: ModelSpec,
    device: str,
    dtype: torch.dtype,
    mlm: bool = False,
    sparse_prediction: bool = False,
    train_len: int = BERT_MAX_LEN,
) -> nn.Module:
    """The bare encoder (or its MLM model), on `device`, in `dtype`, compiled if asked."""
    if spec.cuda_graph and (mlm or not device.startswith("cuda")):
        raise ValueError(
            f"'{spec.variant}': CUDA graphs are an inference lever on a CUDA device "
            f"(asked for {'training' if mlm else 'inference'} on '{device}')"
        )
    with torch.device(device):
        model = _construct(spec, mlm, sparse_prediction, train_len)
    model = model.to(dtype)
    model.train(mlm)
    if spec.compile and spec.family == "flexbert":
        model.compile_layers(dynamic=True)  # the layer stack; unpadding stays eager
    elif spec.compile:
        model = torch.compile(model, dynamic=True)
    if spec.cuda_graph:
        from flexbert.bench.cuda_graphs import GraphedForward

        model = GraphedForward(model)
    return model


def _construct(spec: ModelSpec, mlm: bool, sparse: bool, train_len: int) -> nn.Module:
    if spec.family == "flexbert":
        rope = {"position": {"name": "rope", "fp32": False}} if spec.bf16_rope else {}
        cfg = flexbert_config(spec.size, spec.backend, sparse_prediction=sparse, **rope)
        return flexbert.FlexBertForMaskedLM(cfg) if mlm else flexbert.FlexBertModel(cfg)
    if spec.family == "hf-modernbert":
        from transformers import ModernBertForMaskedLM, ModernBertModel

        cls = ModernBertForMaskedLM if mlm else ModernBertModel
        cfg = hf_modernbert_config(spec.size, sparse_prediction=sparse)
        return cls._from_config(cfg, attn_implementation=spec.backend)
    if spec.family == "bert":
        from transformers import BertForMaskedLM, BertModel

        cls = BertForMaskedLM if mlm else BertModel
        cfg = bert_config(spec.size, train_len)
        return cls._from_config(cfg, attn_implementation=spec.backend)
    raise ValueError(f"unknown model family '{spec.family}'; valid families are {FAMILIES}")


def needs_transformers(spec: ModelSpec) -> bool:
    return spec.family != "flexbert"


def model_specs(
    families: list[str], sizes: list[str], device: str, compile_: bool, backends: list[str] | None
) -> list[ModelSpec]:
    """Every model of the run: FlexBERT per backend (+ one compiled), HF per attention impl.

    BERT exists in one size here (base; tiny for CPU tests), as in the paper.
    """
    specs: list[ModelSpec] = []
    for family in [f for f in families if f != "none"]:
        if family not in FAMILIES:
            raise ValueError(f"unknown model '{family}'; valid models are {list(FAMILIES)}")
        for size in sizes:
            if family == "flexbert":
                names = backends or flexbert_backends(device)
                for name in names:  # "varlen+compile" asks for the compiled variant alone
                    specs.append(ModelSpec.parse(family, size, name))
                if compile_:
                    first = names[0].partition("+")[0]
                    specs.append(ModelSpec(family, size, first, compile=True))
            elif family == "hf-modernbert":
                specs += [ModelSpec(family, size, b) for b in hf_backends(device)]
            elif size in ("tiny", "base"):
                specs.append(ModelSpec(family, size, "sdpa"))
    return list(dict.fromkeys(specs))  # --compile on top of "x+compile" adds no duplicate
