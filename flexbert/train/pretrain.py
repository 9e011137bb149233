"""`flexbert-train`: MLM pretraining with Composer (Hydra entry point).

The Hydra-driven trainer and the embedded quickstart land with their own issue; until then
this command says what exists today and what is coming, and exits cleanly.
"""

from __future__ import annotations

import sys

PLANNED = """\
flexbert-train: the pretraining entry point.

Available now:
  - the model core: flexbert.ModelConfig.preset("tiny" | "base" | "large"), FlexBertForMaskedLM
  - Hugging Face ModernBERT interop: FlexBertForMaskedLM.from_hf(dir) / model.save_hf(dir)
  - Composer wrapper: flexbert.train.composer_model.ComposerFlexBertMLM
  - data tools: flexbert-data tokenizer | prepare

Coming next (the quickstart): with no arguments this command will build a small corpus from
the Python standard library, train a tokenizer, write MDS shards, pretrain a tiny model on the
CPU for a few minutes, evaluate, and export a Hugging Face checkpoint.
"""


def main(argv: list[str] | None = None) -> int:
    print(PLANNED, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
