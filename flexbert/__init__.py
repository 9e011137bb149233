"""FlexBERT: a config-driven framework for modern bidirectional encoders."""

from flexbert.colbert import FlexBertForColBERT
from flexbert.config import ModelConfig
from flexbert.growth import GrowthReport, grow_model
from flexbert.heads import (
    FlexBertForMaskedLM,
    FlexBertForMultipleChoice,
    FlexBertForQuestionAnswering,
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
)
from flexbert.model import FlexBertModel
from flexbert.outputs import FlexBertOutput
from flexbert.registry import ConfigError

__all__ = [
    "ConfigError",
    "FlexBertForColBERT",
    "FlexBertForMaskedLM",
    "FlexBertForMultipleChoice",
    "FlexBertForQuestionAnswering",
    "FlexBertForSentenceEmbedding",
    "FlexBertForSequenceClassification",
    "FlexBertForTokenClassification",
    "FlexBertModel",
    "FlexBertOutput",
    "GrowthReport",
    "ModelConfig",
    "grow_model",
]
