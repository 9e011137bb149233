"""One table over the jobs of a sweep: what each job changed and how it did.

After `flexbert-train -m ...` (or `flexbert-finetune -m ...`) the `SweepReport` Hydra callback
reads every job's `summary.json` and `.hydra/overrides.yaml` and writes, into the sweep
directory, `sweep_results.md` (printed too) and `sweep_results.json`. Only the overrides that
differ between jobs become columns. When the sweep varies `seed`, a second table groups the
jobs that differ only in their seed: each metric's mean +- standard deviation and median over
the seeds (fine-tuning results are usually reported that way). For a sweep directory from any
time:

    python -m flexbert.train.sweep multirun/pretrain/<time>
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS_MD = "sweep_results.md"
RESULTS_JSON = "sweep_results.json"
SEEDS_JSON = "sweep_over_seeds.json"
SEED_KEYS = ("seed", "+seed", "++seed")


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
    varying = _varying(rows)
    metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    head = ["job", *varying, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], *(r["overrides"].get(k, "-") for k in varying)]
        cells += [_fmt(r["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs that differ only in their seed, grouped: for each numeric metric the number of
    seeds, mean, standard deviation (0 for one seed), median, min and max. Empty when the
    sweep does not vary the seed."""
    varying = _varying(rows)
    if not any(k in SEED_KEYS for k in varying):
        return []
    setting = [k for k in varying if k not in SEED_KEYS]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["overrides"].get(k) for k in setting), []).append(r)
    out = []
    for values, members in groups.items():
        stats = {}
        for m in dict.fromkeys(m for r in members for m in r["metrics"]):
            xs = [r["metrics"].get(m) for r in members]
            xs = [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if not xs:
                continue
            stats[m] = {
                "n": len(xs),
                "mean": statistics.fmean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "median": statistics.median(xs),
                "min": min(xs),
                "max": max(xs),
            }
        seeds = [
            next((r["overrides"][k] for k in SEED_KEYS if k in r["overrides"]), None)
            for r in members
        ]
        out.append({"overrides": dict(zip(setting, values)), "seeds": seeds, "metrics": stats})
    return out


def seed_table(groups: list[dict[str, Any]]) -> str:
    """Markdown: the setting, its number of seeds, then `mean +- std (median)` per metric."""
    setting = list(groups[0]["overrides"])
    metrics = [
        m for m in dict.fromkeys(m for g in groups for m in g["metrics"]) if m != "parameters"
    ]
    head = [*setting, "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [str(g["overrides"][k]) for k in setting] + [str(len(g["seeds"]))]
        for m in metrics:
            st = g["metrics"].get(m)
            cells.append(
                "-"
                if st is None
                else f"{_fmt(st['mean'])} ± {_fmt(st['std'])} ({_fmt(st['median'])})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(sweep_dir: str | Path) -> str:
    """Write sweep_results.md and .json into `sweep_dir` (and, when the sweep varies the
    seed, sweep_over_seeds.json); return the table(s)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    text = table(rows) if rows else "(no finished jobs: no summary.json under the sweep dir)"
    groups = over_seeds(rows)
    if groups:
        text += "\n\nover seeds: mean ± std (median)\n\n" + seed_table(groups)
    (sweep_dir / RESULTS_MD).write_text(text + "\n")
    (sweep_dir / RESULTS_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    if groups:
        (sweep_dir / SEEDS_JSON).write_text(json.dumps(groups, indent=2) + "\n")
    else:  # no seed axis (any more): no stale table from an earlier report
        (sweep_dir / SEEDS_JSON).unlink(missing_ok=True)
    return text


class SweepReport(Callback):
    """Hydra callback: the sweep's table once every job has returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        text = write_report(sweep_dir)
        print(f"\nsweep results ({sweep_dir / RESULTS_MD}):\n{text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(
            "usage: python -m flexbert.train.sweep SWEEP_DIR\n\nRebuild sweep_results.md "
            "(and .json) over the jobs of a Hydra multirun folder."
        )
        return 0
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
