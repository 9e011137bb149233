"""`flexbert-finetune`: GLUE-style classification/regression, token classification, retrieval.

The Hydra-driven fine-tuning recipes land with their own issue; the heads they train exist
today (FlexBertForSequenceClassification, ...ForTokenClassification, ...ForSentenceEmbedding).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "flexbert-finetune: fine-tuning recipes are not implemented yet. The heads exist: "
        "FlexBertForSequenceClassification.from_hf(dir, num_labels=N) loads a pretrained encoder."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
