"""The efficiency targets, checked against a benchmark's rows: met, missed or not measured.

GPU targets are ModernBERT-base figures (bf16, one GPU; HF ModernBERT from the same run is
shown beside them), and large's inference minima are base's scaled by the two models'
forward FLOPs per token ("in proportion to its FLOPs"); the achieved TFLOP/s is shown beside
each. The CPU target is FlexBERT / HF ModernBERT >= 1.0 on every workload both ran.
`flexbert-bench` writes the check as targets.md next to results.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexbert.bench.report import Row, batch_text, ratios
from flexbert.config import ModelConfig
from flexbert.flops import forward_flops_per_token


@dataclass(frozen=True)
class Target:
    what: str  # a short description
    mode: str  # inference | train | max-batch
    workload: str  # a row label: fixed-512, var-256, ..., mlm-1024
    minimum: float  # tokens/s for inference/train; FlexBERT/HF for max-batch
    size: str = "base"


# Mean attention context per token of each workload: a token sees its own document, so for
# lengths N(m, (m/4)^2) that is E[L^2] / E[L] = m + m / 16.
CONTEXT = {"fixed-512": 512, "var-256": 272, "fixed-8192": 8192, "var-4096": 4352, "mlm-1024": 1024}
BASE_INFERENCE = (
    ("fixed 512", "fixed-512", 2.0e6),
    ("variable ~256", "var-256", 1.8e6),
    ("fixed 8192", "fixed-8192", 1.0e6),
    ("variable ~4096", "var-4096", 1.2e6),
)


def flops_per_token(size: str, workload: str) -> float:
    return forward_flops_per_token(ModelConfig.preset(size), CONTEXT[workload])


GPU_TARGETS = (
    *(Target(f"base inference, {what}", "inference", w, m) for what, w, m in BASE_INFERENCE),
    *(
        Target(
            f"large inference, {what} (base's x FLOPs ratio)",
            "inference",
            w,
            round(m * flops_per_token("base", w) / flops_per_token("large", w), -3),
            size="large",
        )
        for what, w, m in BASE_INFERENCE
    ),
    Target("max batch at 8192, x HF ModernBERT", "max-batch", "fixed-8192", 2.0),
    Target("base MLM training, 1024 packed", "train", "mlm-1024", 5.0e5),
)
CPU_MIN_RATIO = 1.0


def _best(rows: list[Row], family: str, target: Target) -> Row | None:
    found = [
        r
        for r in rows
        if r["status"] == "ok"
        and r["family"] == family
        and r["size"] == target.size
        and r["mode"] == target.mode
        and r["label"] == target.workload
        and r.get("tokens_per_s")
    ]
    return max(found, key=lambda r: r["tokens_per_s"]) if found else None


def decided(ratio: float, minimum: float, ours_at_least: bool, theirs_at_least: bool) -> bool:
    """Whether a max-batch ratio settles its target when a search stopped early (its figure
    a lower bound): ours stopped -> the true ratio is higher, so only a pass is certain;
    theirs stopped -> it is lower, so only a miss is; both -> nothing is."""
    if ours_at_least and theirs_at_least:
        return False
    if ours_at_least:
        return ratio >= minimum
    if theirs_at_least:
        return ratio < minimum
    return True


def measured_on(rows: list[Row], device: str, device_name: str) -> tuple[str, str]:
    """(device, device name) the rows were measured on: theirs when they agree (a report
    redrawn on another machine from fetched GPU rows keeps the GPU targets), else the given."""
    seen = {(r.get("device"), r.get("device_name")) for r in rows if r.get("status") == "ok"}
    if len(seen) == 1:
        theirs = seen.pop()
        if theirs[0]:
            return theirs[0], theirs[1] or device_name
    return device, device_name


def check(rows: list[Row], device: str) -> list[dict[str, Any]]:
    """One entry per target: value, minimum, `met` (None when it was not measured)."""
    if not device.startswith("cuda"):
        return [
            {
                "target": f"{e['size']} {e['mode']} {e['workload']}: FlexBERT / HF >= 1.0",
                "value": e["speed_ratio"],
                "minimum": CPU_MIN_RATIO,
                "met": e["speed_ratio"] >= CPU_MIN_RATIO,
                "detail": f"{e['flexbert_variant']} vs {e['hf_variant']}",
            }
            for e in ratios(rows)
            if e["mode"] != "max-batch"
        ]
    out = []
    batch = {(e["size"], e["workload"]): e for e in ratios(rows) if e["mode"] == "max-batch"}
    for t in GPU_TARGETS:
        if t.mode == "max-batch":
            e = batch.get((t.size, t.workload))
            value = e["max_batch_ratio"] if e else None
            detail = ""
            if e:
                flex = batch_text(e["flexbert_max_batch"], e.get("flexbert_max_batch_bound"))
                hf = batch_text(e["hf_max_batch"], e.get("hf_max_batch_bound"))
                detail = f"{flex} vs {hf}"
                coarse = "resolution" in (
                    e.get("flexbert_max_batch_bound"),
                    e.get("hf_max_batch_bound"),
                )  # each figure within 1/16 below its true maximum: the ratio within ~1/8
                close = coarse and abs(value - t.minimum) < t.minimum / 8
                if close or not decided(
                    value, t.minimum, flex.startswith(">="), hf.startswith(">=")
                ):
                    detail += " (a search stopped at its cap or time limit: not decided)"
                    value = None
        else:
            ours, hf = _best(rows, "flexbert", t), _best(rows, "hf-modernbert", t)
            value = ours["tokens_per_s"] if ours else None
            detail = (f"[{ours['variant']}]" if ours else "") + (
                f", HF {hf['tokens_per_s']:,.0f} [{hf['variant']}]" if hf else ""
            )
            if ours and t.mode == "inference":  # forward only; training would be ~3x
                tflops = value * flops_per_token(t.size, t.workload) / 1e12
                detail += f", {tflops:.0f} TFLOP/s"
        met = None if value is None else value >= t.minimum
        out.append(
            {"target": t.what, "value": value, "minimum": t.minimum, "met": met, "detail": detail}
        )
    return out


def format_markdown(results: list[dict[str, Any]], device_name: str) -> str:
    """A Markdown table of the check, for docs/benchmarks.md."""
    lines = [
        f"Targets on {device_name}:",
        "",
        "| target | measured | minimum | met | detail |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        value = "-" if r["value"] is None else _num(r["value"])
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        lines.append(f"| {r['target']} | {value} | {_num(r['minimum'])} | {met} | {r['detail']} |")
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"
