"""flexbert-bench on the CPU: token accounting, packing, OOM isolation, the CLI end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch

from flexbert.bench import cli, report, runners, suite, targets, timing, workloads

ID_RANGE = (5, 512)


@pytest.mark.parametrize("key", workloads.WORKLOAD_KEYS)
def test_lengths_follow_the_protocol(key):
    w = workloads.make_workload(key)
    lengths = workloads.sample_lengths(w, 400, seed=3)
    assert min(lengths) >= 16 and max(lengths) <= w.max_len
    if w.variable:
        mean = sum(lengths) / len(lengths)
        assert abs(mean - w.max_len / 2) < w.max_len / 20
        assert w.label == f"var-{w.max_len // 2}"
    else:
        assert set(lengths) == {w.max_len}


def test_packed_and_padded_batches_hold_the_same_real_tokens():
    w = workloads.make_workload("var-short", 64, 256)
    lengths = workloads.sample_lengths(w, 11, seed=1)
    docs = workloads.make_documents(lengths, ID_RANGE)
    packed = workloads.make_batches(docs, 4, "packed", "cpu")
    padded = workloads.make_batches(docs, 4, "padded", "cpu", pad_id=0)
    assert sum(b.num_tokens for b in packed) == sum(b.num_tokens for b in padded) == sum(lengths)
    flat_packed = torch.cat([b.kwargs["input_ids"] for b in packed])
    flat_padded = torch.cat(
        [b.kwargs["input_ids"][b.kwargs["attention_mask"].bool()] for b in padded]
    )
    assert torch.equal(flat_packed, flat_padded)  # same documents, same order
    first = packed[0].kwargs
    assert first["cu_seqlens"].dtype == torch.int32
    assert first["cu_seqlens"][-1].item() == first["input_ids"].numel()
    assert isinstance(first["max_seqlen"], int) and first["max_seqlen"] == max(lengths[:4])
    assert flat_packed.min() >= ID_RANGE[0]  # special ids avoided


def test_pack_rows_covers_every_token_exactly_once():
    lengths = [300, 17, 1024, 5, 2000, 90]
    rows = workloads.pack_rows(lengths, 256)
    seen = {doc: [] for doc in range(len(lengths))}
    for row in rows[:-1]:
        assert sum(stop - start for _, start, stop in row) == 256  # full rows
    for row in rows:
        for doc, start, stop in row:
            seen[doc].append((start, stop))
    for doc, length in enumerate(lengths):
        spans = sorted(seen[doc])
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    assert sum(stop - start for row in rows for _, start, stop in row) == sum(lengths)


def test_training_rows_are_full_and_masked_at_thirty_percent():
    rows = workloads.training_rows(6, 128, ID_RANGE)
    assert rows.shape == (6, 128)
    ids, labels = workloads.mlm_mask(rows, mask_id=3)
    chosen = labels != -100
    assert 0.25 < chosen.float().mean().item() < 0.35
    assert torch.equal(labels[chosen], rows[chosen]) and (ids[chosen] == 3).all()


def test_max_batch_search_finds_the_oom_threshold_and_isolates_failures(capsys):
    attempts = []

    def fake_runner(batch: int) -> None:
        attempts.append(batch)
        if batch > 37:
            raise torch.OutOfMemoryError("fake OOM")

    def try_batch(batch: int) -> bool:
        return timing.fits(lambda: fake_runner(batch), "cpu")

    assert timing.max_batch_search(try_batch, cap=1000, resolution=0).size == 37
    assert attempts[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling, then bisection
    coarse = timing.max_batch_search(try_batch, cap=1000)  # stops within 1/16
    assert 37 - 37 // 16 <= coarse.size <= 37 and coarse.bound in ("", "resolution")
    assert timing.max_batch_search(try_batch, cap=20) == timing.BatchSearch(20, "cap")
    assert timing.max_batch_search(lambda b: False, cap=8).size == 0
    slow = timing.max_batch_search(lambda b: time.sleep(0.02) or True, cap=10**6, seconds=0.05)
    assert slow.bound == "time limit" and 1 <= slow.size < 10**6
    with pytest.raises(ValueError):  # only out-of-memory is swallowed
        timing.fits(lambda: (_ for _ in ()).throw(ValueError("bug")), "cpu")
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")
    assert capsys.readouterr().err == ""  # torch's own out-of-memory goes without a word
    assert not timing.fits(lambda: (_ for _ in ()).throw(cublas), "cpu")  # an OOM too
    assert "counted as not fitting: RuntimeError: CUDA error: CUBLAS" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="illegal"):
        timing.fits(lambda: (_ for _ in ()).throw(RuntimeError("illegal memory access")), "cpu")


@pytest.mark.parametrize("guess", [300, 290, 319, 330, 500, 40, 3, None])
def test_a_predicted_max_batch_is_bracketed_from_the_prediction(guess):
    attempts = []

    def try_batch(batch: int) -> bool:
        attempts.append(batch)
        return batch <= 300

    found = timing.max_batch_search(try_batch, cap=4096, predict=lambda: guess)
    assert 300 - 300 // 16 <= found.size <= 300 and found.bound in ("", "resolution")
    assert attempts[:2] == [1, 2]  # the prediction is asked once both fit
    large = [a for a in attempts if a > 100]
    if guess in (300, 290, 319):  # within a step of the threshold
        assert attempts[2] == guess and len(large) <= 3, attempts
    if guess == 330:  # 10% over: a few more
        assert attempts[2] == guess and len(large) <= 5, attempts
    if guess is None:  # no prediction: plain doubling
        assert attempts[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    exact = timing.max_batch_search(try_batch, cap=4096, resolution=0, predict=lambda: guess)
    assert exact == timing.BatchSearch(300)
    assert timing.max_batch_search(try_batch, cap=200, predict=lambda: guess).size == 200


def test_peak_memory_predicts_the_batch_that_fills_the_device():
    weights, per_row, available = 3e9, 2e8, 80e9
    peaks = {n: weights + n * per_row for n in (1, 2)}
    expected = int((0.95 * available - weights) / per_row)
    assert timing.predicted_max_batch(peaks, available) == expected
    assert timing.predicted_max_batch({**peaks, 4: weights + 4 * per_row}, available) == expected
    assert timing.predicted_max_batch({1: weights}, available) is None  # one point: no slope
    assert timing.predicted_max_batch({1: weights, 2: weights}, available) is None


@pytest.mark.parametrize(
    "ours, theirs, ratio, met",
    [
        (None, None, 2.5, True),
        (None, None, 1.5, False),
        ("cap", None, 2.5, True),  # ours is at least that: a pass is certain
        ("cap", None, 1.5, None),
        (None, "time limit", 1.5, False),  # theirs is at least that: a miss is certain
        (None, "cap", 2.5, None),
        ("cap", "cap", 1.0, None),
        ("resolution", None, 2.0625, None),  # within 1/16 either way of the target
        ("resolution", "resolution", 3.0, True),
    ],
)
def test_a_max_batch_search_stopped_early_decides_only_what_it_can(ours, theirs, ratio, met):
    rows = [
        {
            **_row("flexbert", "max-batch", "fixed-8192", max_batch=int(16 * ratio)),
            "max_batch_bound": ours,
        },
        {
            **_row("hf-modernbert", "max-batch", "fixed-8192", max_batch=16),
            "max_batch_bound": theirs,
        },
    ]
    (entry,) = [e for e in targets.check(rows, "cuda") if e["target"].startswith("max batch")]
    assert entry["met"] is met


def test_interleaved_timing_reports_every_pass():
    calls = []
    results = timing.time_interleaved(
        [lambda: calls.append("a"), lambda: calls.append("b")], "cpu", warmup=1, repeats=3
    )
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert [len(r.seconds) for r in results] == [3, 3]
    spread = results[0].spread()
    assert spread["seconds_min"] <= results[0].median <= spread["seconds_max"]


def test_model_specs_expand_backends_and_compile():
    specs = runners.model_specs(["flexbert", "hf-modernbert", "bert"], ["base"], "cpu", True, None)
    names = [(s.name, s.variant) for s in specs]
    assert names == [
        ("flexbert-base", "sdpa"),
        ("flexbert-base", "sdpa+compile"),
        ("hf-modernbert-base", "sdpa"),
        ("bert-base", "sdpa"),
    ]
    only = runners.model_specs(["flexbert"], ["large"], "cuda", False, ["varlen+compile"])
    assert only == [runners.ModelSpec("flexbert", "large", "varlen", compile=True)]
    both = runners.ModelSpec.parse("flexbert", "base", "varlen+bf16rope+compile")
    assert both.compile and both.bf16_rope and both.variant == "varlen+compile+bf16rope"
    with pytest.raises(
        ValueError, match="unknown variant option.*valid: \\['bf16rope', 'compile', 'cudagraph'\\]"
    ):
        runners.ModelSpec.parse("flexbert", "base", "varlen+fp8")


def test_bf16_rope_variant_builds_a_model_that_rotates_in_bf16():
    spec = runners.ModelSpec.parse("flexbert", "tiny", "sdpa+bf16rope")
    model = runners.build_model(spec, "cpu", torch.bfloat16)
    assert model.config.position.fp32 is False
    plain = runners.build_model(
        runners.ModelSpec("flexbert", "tiny", "sdpa"), "cpu", torch.bfloat16
    )
    assert plain.config.position.fp32 is True


def test_cli_tiny_run_writes_consistent_results(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--device", "cpu", "--tiny", "--num-docs", "6,2", "--batch-size", "4,1"]
    args += ["--repeats", "2", "--warmup", "0", "--train-steps", "1", "--train-rows", "2"]
    args += ["--train-len", "64", "--out", str(out), "--no-plot", "--threads", "1"]
    assert cli.main(args) == 0
    assert (out / "targets.md").read_text().startswith("Targets on ")
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert all(set(r) == set(report.ROW_KEYS) for r in rows)
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    infer = [r for r in rows if r["mode"] == "inference"]
    assert {r["model"] for r in infer} == {"flexbert-tiny", "hf-modernbert-tiny", "bert-tiny"}
    by_workload: dict[str, set[int]] = {}
    for r in infer:  # every model counted the same real tokens of the same documents
        by_workload.setdefault(r["label"], set()).add(r["tokens"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
        assert r["dtype"] == "float32" and r["torch"] == torch.__version__
    assert all(len(tokens) == 1 for tokens in by_workload.values())
    w = workloads.make_workload("var-short", 128, 512)
    assert by_workload["var-64"] == {sum(workloads.sample_lengths(w, 6))}
    assert by_workload["fixed-512"] == {2 * 512}
    train = [r for r in rows if r["mode"] == "train"]
    assert {(r["model"], r["sparse_prediction"]) for r in train} >= {
        ("flexbert-tiny", False),
        ("flexbert-tiny", True),
        ("hf-modernbert-tiny", False),
    }
    assert all(r["tokens"] == 2 * 64 for r in train)
    assert {e["workload"] for e in doc["ratios"]} >= {"fixed-128", "var-64", "mlm-64"}
    printed = capsys.readouterr().out
    assert "FlexBERT / HF ModernBERT" in printed and (out / "results.txt").exists()


def test_a_training_only_run_builds_no_inference_model(tmp_path, monkeypatch):
    built = []
    real = suite._build_or_report
    monkeypatch.setattr(
        suite, "_build_or_report", lambda spec, *a: built.append(spec) or real(spec, *a)
    )
    args = ["--device", "cpu", "--tiny", "--workloads", "none", "--models", "flexbert"]
    args += ["--train-steps", "1", "--train-rows", "2", "--train-len", "64", "--warmup", "0"]
    assert cli.main([*args, "--out", str(tmp_path), "--no-plot", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert built == [] and rows and {r["mode"] for r in rows} == {"train"}


def test_report_table_and_plot_handle_failed_rows(tmp_path):
    ok = report.make_row(
        model="flexbert-tiny",
        family="flexbert",
        size="tiny",
        variant="sdpa",
        mode="inference",
        label="fixed-128",
        tokens_per_s=10.0,
        seconds=1.0,
        seconds_min=0.9,
        seconds_max=1.1,
        device_name="cpu",
        dtype="float32",
        status="ok",
    )
    failed = {**ok, "variant": "varlen", "tokens_per_s": None, "seconds": None}
    failed.update(seconds_min=None, seconds_max=None, status="error", note="needs CUDA")
    table = report.format_table([ok, failed])
    assert "needs CUDA" in table and "10" in table
    with pytest.raises(KeyError):
        report.make_row(tokens=1, typo=2)
    path = report.plot([ok, failed], tmp_path / "p.png")
    assert path is None or path.exists()


def _row(family, mode, label, tps=None, size="base", max_batch=None, variant="varlen"):
    return report.make_row(
        model=f"{family}-{size}",
        family=family,
        size=size,
        variant=variant,
        mode=mode,
        label=label,
        tokens_per_s=tps,
        max_batch_size=max_batch,
        status="ok",
    )


def test_gpu_targets_are_met_missed_or_not_measured():
    from flexbert.bench import targets

    rows = [
        _row("flexbert", "inference", "fixed-512", 2.5e6),
        _row("flexbert", "inference", "fixed-512", 1.0e6, variant="sdpa"),  # the best counts
        _row("hf-modernbert", "inference", "fixed-512", 6.0e5, variant="sdpa"),
        _row("flexbert", "inference", "var-256", 1.7e6),
        _row("flexbert", "max-batch", "fixed-8192", max_batch=40),
        _row("hf-modernbert", "max-batch", "fixed-8192", max_batch=16),
    ]
    result = {r["target"]: r for r in targets.check(rows, "cuda")}
    fixed = result["base inference, fixed 512"]
    assert fixed["met"] is True and fixed["value"] == 2.5e6 and "HF 600,000" in fixed["detail"]
    assert "597 TFLOP/s" in fixed["detail"]  # 2.5M tokens/s x ~239 MFLOP per token
    assert result["base inference, variable ~256"]["met"] is False
    assert result["base inference, fixed 8192"]["met"] is None  # not measured
    assert result["max batch at 8192, x HF ModernBERT"]["value"] == 2.5
    text = targets.format_markdown(list(result.values()), "NVIDIA H200")
    assert "| base inference, variable ~256 | 1,700,000 | 1,800,000 | **no** |" in text


def test_cpu_target_is_parity_with_hf_on_every_workload():
    from flexbert.bench import targets

    rows = [
        _row("flexbert", "inference", "fixed-128", 110.0, size="tiny", variant="sdpa"),
        _row("hf-modernbert", "inference", "fixed-128", 100.0, size="tiny", variant="sdpa"),
        _row("flexbert", "train", "mlm-256", 90.0, size="tiny", variant="sdpa"),
        _row("hf-modernbert", "train", "mlm-256", 100.0, size="tiny", variant="sdpa"),
    ]
    met = {r["target"].split(":")[0]: r["met"] for r in targets.check(rows, "cpu")}
    assert met == {"tiny inference fixed-128": True, "tiny train mlm-256": False}


def test_flops_per_token_match_the_issue_figures_and_scale_the_large_targets():
    from flexbert import ModelConfig
    from flexbert.bench import targets
    from flexbert.flops import forward_flops_per_token

    base = ModelConfig.preset("base")
    # issue 4: "ModernBERT-base needs about 240 MFLOP per token at 512 and 430 at 8192"
    assert abs(forward_flops_per_token(base, 512) / 240e6 - 1) < 0.02
    assert abs(forward_flops_per_token(base, 8192) / 430e6 - 1) < 0.02
    large = {t.workload: t.minimum for t in targets.GPU_TARGETS if t.size == "large"}
    assert set(large) == {"fixed-512", "var-256", "fixed-8192", "var-4096"}
    assert 0.3 < large["fixed-512"] / 2.0e6 < 0.36  # large costs ~3x base per token at 512
    assert large["fixed-8192"] / 1.0e6 > large["fixed-512"] / 2.0e6  # attention shares more


def test_a_report_redrawn_elsewhere_keeps_the_rows_device():
    from flexbert.bench import targets

    gpu = {"device": "cuda", "device_name": "NVIDIA H200"}
    rows = [{**_row("flexbert", "inference", "fixed-512", 2.5e6), **gpu}]
    assert targets.measured_on(rows, "cpu", "AMD EPYC") == ("cuda", "NVIDIA H200")
    mixed = [*rows, {**rows[0], "device": "cpu", "device_name": "AMD EPYC"}]
    assert targets.measured_on(mixed, "cpu", "AMD EPYC") == ("cpu", "AMD EPYC")


@pytest.mark.parametrize(
    "extra", [["--num-docs", "4"], ["--train", "--train-rows", "2", "--train-len", "64"]]
)
def test_profiling_lists_top_ops_of_both_models(extra, capsys):
    from flexbert.bench import profiling

    assert profiling.main(["--size", "tiny", "--rows", "3", *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and "flexbert-tiny" in out and "hf-modernbert-tiny" in out
    assert "aten::mm" in out or "aten::addmm" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--models", "flexbrt"], "unknown model 'flexbrt'"),
        (["--workloads", "fixed-long2"], "unknown workload"),
        (["--num-docs", "abc"], "--num-docs: expected N or SHORT,LONG"),
        (["--device", "tpu"], "expected cuda, cuda:N, cpu or auto"),
    ],
)
def test_bad_bench_arguments_are_one_line_and_exit_2(args, needle, tmp_path, capsys):
    assert cli.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexbert-bench: error:") and needle in err
    assert "Traceback" not in err and not (tmp_path / "results.json").exists()
