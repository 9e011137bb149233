"""`flexbert-export`: a training checkpoint -> Hugging Face directory (lands with training)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "flexbert-export: exporting Composer checkpoints is not implemented yet; a model in "
        "memory already exports with model.save_hf(out_dir)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
