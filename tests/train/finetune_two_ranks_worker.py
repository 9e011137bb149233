"""One rank of a two-process fine-tuning run (torch.distributed.run, gloo on the CPU), as
`composer -n 2 flexbert-finetune ...` runs one: argv = model dir, train CSV, eval CSV, run dir."""

from __future__ import annotations

import sys

from flexbert.train.finetune import train
from tests.train.finetune_helpers import FAST, compose_finetune

model, train_csv, eval_csv, run_dir = sys.argv[1:5]
overrides = [
    f"model.path={model}",
    f"task.dataset.files.train={train_csv}",
    f"task.dataset.files.validation={eval_csv}",
    *FAST,
    "data.batch_size=8",  # 4 rows per rank
    "data.eval_batch_size=4",  # 2 per rank: the 7 eval rows are 4 batches of 2 (one repeated)
    "trainer.max_duration=1ba",  # barely trained: some eval rows right, some wrong
]
train(compose_finetune(overrides), run_dir)
