"""One table over the jobs of a sweep: what each job changed and how it did.

After `flexbert-train -m ...` (or `flexbert-finetune -m ...`) the `SweepReport` Hydra callback
reads every job's `summary.json` and `.hydra/overrides.yaml` and writes, into the sweep
directory, `sweep_results.md` (printed too) and `sweep_results.json`. Only the overrides that
differ between jobs become columns. For a sweep directory from any time:

    python -m flexbert.train.sweep multirun/pretrain/<time>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS_MD = "sweep_results.md"
RESULTS_JSON = "sweep_results.json"


def _overrides(job_dir: Path) -> dict[str, str]:
    """`key=value` overrides of a job, from Hydra's record of it."""
    import yaml

    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(str(item).split("=", 1) for item in items if "=" in str(item))


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    train = summary.get("train", {})
    out = {f"eval.{k}": v for k, v in sorted((summary.get("eval") or {}).items())}
    out["train.loss_last"] = train.get("loss_last")
    if train.get("tokens_per_second") is not None:
        out["train.tokens_per_second"] = train["tokens_per_second"]
    best = summary.get("eval_best")  # fine-tuning: the best evaluation and when it came
    if best:
        out[f"best.{best['metric']}"] = best["value"]
        out["best.epoch"] = best["epoch"]
    out["parameters"] = summary.get("parameters")
    return out


def _job_order(job: Path) -> tuple[int, str]:
    """Job folders are named by Hydra's job number (`3`, or `3_sst2`): numeric order."""
    head = job.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, job.name)


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job that finished (has a summary.json), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}")
    jobs = [p.parent for p in sweep_dir.glob("*/summary.json")]
    jobs.sort(key=_job_order)
    rows = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        rows.append({"job": job.name, "overrides": _overrides(job), "metrics": _metrics(summary)})
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: job, the overrides that vary across jobs, then every metric."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    head = ["job", *varying, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], *(r["overrides"].get(k, "-") for k in varying)]
        cells += [_fmt(r["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(sweep_dir: str | Path) -> str:
    """Write sweep_results.md and .json into `sweep_dir`; return the table."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    text = table(rows) if rows else "(no finished jobs: no summary.json under the sweep dir)"
    (sweep_dir / RESULTS_MD).write_text(text + "\n")
    (sweep_dir / RESULTS_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    return text


class SweepReport(Callback):
    """Hydra callback: the sweep's table once every job has returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        text = write_report(sweep_dir)
        print(f"\nsweep results ({sweep_dir / RESULTS_MD}):\n{text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flexbert.train.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(args[0]))
    except FileNotFoundError as err:
        print(f"flexbert.train.sweep: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
