"""`flexbert-bench`: the paper's efficiency protocol, FlexBERT against Hugging Face encoders.

Modules, one job each: `workloads` (synthetic document sets and the training packer),
`runners` (model builders), `timing` (timed passes, peak memory, max-batch search), `train`
(MLM training throughput), `report` (table, results.json, plot), `gpu_checks` (numerical
sanity on a GPU before timing) and `cli`. Only torch is imported at module level, so the
benchmark runs on a bare GPU box with `PYTHONPATH=. python -m flexbert.bench.cli`.
"""
