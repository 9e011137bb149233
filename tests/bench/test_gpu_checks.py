"""flexbert.bench.gpu_checks on the CPU: the checks scripts/gpu_bench.sh runs first on a GPU."""

from __future__ import annotations

import json

import torch

from flexbert.attention import backends
from flexbert.bench import gpu_checks


def test_gpu_checks_agree_on_cpu(tmp_path):
    assert gpu_checks.main(["--device", "cpu", "--sizes", "tiny", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_checks.json").read_text())
    checks = {r["check"] for r in doc["results"]}
    assert doc["all_pass"] and checks >= {
        "backend",
        "backward",
        "bf16rope",
        "hostsync",
        "hf_parity",
    }
    assert doc["complete"]
    backend_entries = {r["backend"] for r in doc["results"] if r["check"] == "backend"}
    assert backend_entries == {"sdpa", "sdpa/padded", "flex", "flex/padded"}
    (syncs,) = [r for r in doc["results"] if r["check"] == "hostsync"]
    assert syncs["forward_ops"] == syncs["backward_ops"] == []
    assert syncs["forward_syncs"] == syncs["backward_syncs"] == 0
    assert syncs["without_positions_syncs"] == 1  # the head's own nonzero: the check sees


def test_gpu_checks_reference_and_padded_entries_run_the_padded_layout(monkeypatch):
    """eager, the ground truth, never shares the unpadding code with what it checks, and
    the padded layout of the backends that have one is checked too."""
    seen: dict[str, set[bool]] = {"eager": set(), "sdpa": set()}
    for name in seen:
        backend = backends._REGISTERED[name]

        def spy(q, k, v, layout, *args, _fn=backend.fn, _name=name):
            seen[_name].add(layout.padded)
            return _fn(q, k, v, layout, *args)

        monkeypatch.setattr(backend, "fn", spy)
    entries = list(gpu_checks.check_backends("tiny", "cpu", torch.float32))
    assert [e["backend"] for e in entries] == ["sdpa", "sdpa/padded"]
    assert all(e["pass"] for e in entries)
    assert "packed_vs_eager" not in entries[1] and "padded_vs_eager" in entries[1]
    assert seen == {"eager": {True}, "sdpa": {False, True}}
    lines = [gpu_checks.summary_line(e) for e in entries]
    assert "padded_vs_eager=" in lines[1] and lines[1].endswith(" ok")


def test_gpu_checks_save_after_every_check():
    """A run killed by its time limit keeps the checks it finished."""
    saved = []
    report = gpu_checks.run_checks(
        ["tiny"], "cpu", torch.float32, lambda r: saved.append((len(r["results"]), r["complete"]))
    )
    n = len(report["results"])
    assert saved == [(i, False) for i in range(1, n + 1)] + [(n, True)]


def test_gpu_checks_slow_part_adds_to_the_fast_parts_report(tmp_path):
    """scripts/gpu_bench.sh checks the compiled backends (flex) in a later phase of their own;
    on the CPU flex runs uncompiled and forward only."""
    args = ["--device", "cpu", "--sizes", "tiny", "--out", str(tmp_path)]
    assert gpu_checks.main([*args, "--part", "fast"]) == 0
    fast = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert fast["parts"] == ["fast"] and fast["complete"]
    fast["results"][0]["pass"] = False  # an earlier failure stays a failure
    (tmp_path / "gpu_checks.json").write_text(json.dumps(fast))
    assert gpu_checks.main([*args, "--part", "slow"]) == 1
    both = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert both["parts"] == ["fast", "slow"] and both["complete"] and not both["all_pass"]
    added = both["results"][len(fast["results"]) :]
    assert both["results"][: len(fast["results"])] == fast["results"]
    assert [(r["check"], r["backend"], r["pass"]) for r in added] == [
        ("backend", "flex", True),
        ("backend", "flex/padded", True),
        ("backward", "flex", None),  # no FlexAttention backward on the CPU: skipped
    ]
