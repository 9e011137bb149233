"""FlexBERT data pipeline: tokenizer, corpora, MDS shards, packing and MLM masking.

Submodules import their heavy dependencies (streaming, transformers) themselves, so importing
`flexbert.data` stays cheap; import from the submodules directly.
"""

from flexbert.data.corpus import CorpusSpec, Document, read_path, split_of
from flexbert.data.errors import DataError, DataFileNotFoundError
from flexbert.data.masking import MLMMasker
from flexbert.data.packing import PackedBatch, Prefetcher, SequencePacker

__all__ = [
    "CorpusSpec",
    "DataError",
    "DataFileNotFoundError",
    "Document",
    "MLMMasker",
    "PackedBatch",
    "Prefetcher",
    "SequencePacker",
    "read_path",
    "split_of",
]
