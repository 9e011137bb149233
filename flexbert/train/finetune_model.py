"""Composer wrapper and metrics for fine-tuning FlexBERT task heads.

Metrics are torchmetrics objects fed with predictions, not logits, so one `update_metric`
serves classification (argmax), regression (the single output) and token classification
(argmax per token, -100 positions dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.models import ComposerModel
from torchmetrics import Metric

from flexbert.heads import IGNORE_INDEX
from flexbert.outputs import FlexBertOutput
from flexbert.train.composer_model import FlexBertComposerModel


class EntityF1(Metric):
    """Token-level micro F1 over the labels other than `outside` (an "O" tag): seqeval-free.

    Precision = correct non-O predictions / non-O predictions; recall = correct / gold non-O.
    """

    def __init__(self, outside: int = 0) -> None:
        super().__init__()
        self.outside = outside
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        pred_entity, gold_entity = preds != self.outside, target != self.outside
        self.correct += (pred_entity & (preds == target)).sum()
        self.predicted += pred_entity.sum()
        self.gold += gold_entity.sum()

    def compute(self) -> torch.Tensor:
        denom = self.predicted + self.gold
        return 2 * self.correct / denom if denom > 0 else torch.tensor(0.0)


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of every entity in a BIO tag sequence (IOB2, or IOB1 where an I-X
    after O or another type opens an entity, as conlleval reads it)."""
    spans, current = set(), None  # current: [type, first, last]
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            spans.add(tuple(current))
            current = None
        if prefix == "B" or (prefix == "I" and not continues):
            current = [kind, i, i]
        elif continues:
            current[2] = i
    return spans


def check_bio_names(label_names: Sequence[str] | None) -> list[str]:
    from flexbert import ConfigError

    bad = [n for n in label_names or [] if n != "O" and n.partition("-")[0] not in ("B", "I")]
    if not label_names or bad:
        raise ConfigError(
            "task.metrics: span_f1 needs BIO label names (O, B-TYPE, I-TYPE) from "
            f"task.label_names, string labels or the dataset's ClassLabel; got {label_names}"
        )
    return list(label_names)


class SpanF1(Metric):
    """CoNLL entity F1: a predicted entity counts when its type and exact span match a gold
    one; micro-averaged over every entity of the evaluation (conlleval / seqeval's default)."""

    def __init__(self, label_names: Sequence[str]) -> None:
        super().__init__()
        self.label_names = check_bio_names(label_names)
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Sequence[int]], target: Sequence[Sequence[int]]) -> None:
        for p, t in zip(preds, target):
            pred = entity_spans([self.label_names[i] for i in p])
            gold = entity_spans([self.label_names[i] for i in t])
            self.correct += len(pred & gold)
            self.predicted += len(pred)
            self.gold += len(gold)

    def compute(self) -> torch.Tensor:
        denom = self.predicted + self.gold
        return 2 * self.correct / denom if denom > 0 else torch.tensor(0.0)


def build_metrics(
    kind: str, num_labels: int, names: Sequence[str], label_names: Sequence[str] | None = None
) -> dict[str, Metric]:
    """The task's metrics by name: accuracy, f1, matthews, pearson, spearman, entity_f1,
    span_f1 (token classification with BIO label names)."""
    from torchmetrics.classification import (
        BinaryF1Score,
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassMatthewsCorrCoef,
    )
    from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

    n = max(num_labels, 2)
    outside = label_names.index("O") if label_names and "O" in label_names else 0
    factories = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=n, average="micro"),
        "f1": lambda: BinaryF1Score() if n == 2 else MulticlassF1Score(n, average="macro"),
        "matthews": lambda: MulticlassMatthewsCorrCoef(num_classes=n),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
        "entity_f1": lambda: EntityF1(outside),
        "span_f1": lambda: SpanF1(label_names),
    }
    allowed = {
        "sequence_classification": ("accuracy", "f1", "matthews"),
        "regression": ("pearson", "spearman"),
        "token_classification": ("accuracy", "f1", "matthews", "entity_f1", "span_f1"),
        "multiple_choice": ("accuracy",),
    }[kind]
    from flexbert import ConfigError

    bad = [m for m in names if m not in allowed]
    if bad:
        raise ConfigError(f"task.metrics: {bad} do not apply to {kind}; choose from {allowed}")
    if "span_f1" in names and label_names is not None and len(label_names) != num_labels:
        raise ConfigError(
            f"task.metrics: span_f1 needs a name for each of the task.num_labels={num_labels} "
            f"labels, got {len(label_names)} ({list(label_names)}); set task.label_names"
        )
    return {m: factories[m]() for m in names}


class ComposerFlexBertClassifier(FlexBertComposerModel):
    """Sequence classification/regression or token classification; loss from the head."""

    def __init__(
        self,
        model: torch.nn.Module,
        kind: str,
        metrics: Sequence[str],
        label_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model)
        self.kind = kind
        self.val_metrics = build_metrics(kind, model.config.num_labels, metrics, label_names)

    def predictions(
        self, outputs: FlexBertOutput, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, targets) as flat tensors, padding and continuation tokens dropped."""
        logits, labels = outputs.logits.detach(), batch["labels"]
        if self.kind == "regression":
            return logits.float().reshape(labels.shape), labels.float()
        preds = logits.argmax(-1)
        if self.kind == "token_classification":
            keep = labels != IGNORE_INDEX
            return preds[keep], labels[keep]
        return preds, labels

    def update_metric(self, batch: dict[str, Any], outputs: FlexBertOutput, metric) -> None:
        if isinstance(metric, SpanF1):  # whole sentences: entities must not run across rows
            preds, labels = outputs.logits.detach().argmax(-1).tolist(), batch["labels"].tolist()
            rows = [
                [(p, t) for p, t in zip(pr, tr) if t != IGNORE_INDEX]
                for pr, tr in zip(preds, labels)
            ]
            metric.update([[p for p, _ in r] for r in rows], [[t for _, t in r] for r in rows])
            return
        preds, target = self.predictions(outputs, batch)
        metric.update(preds, target)


class EvalHistory(Callback):
    """Keep every evaluation's metrics (one per epoch by default): the curve in summary.json."""

    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics.get("eval", {})
        values = {name: round(float(m.compute()), 6) for name, m in metrics.items()}
        self.evals.append(
            {"epoch": int(state.timestamp.epoch), "batch": int(state.timestamp.batch), **values}
        )


def load_task_model(cfg: Any, path: Any = None, tokenizer: Any = None) -> Any:
    """The task head on the pretrained encoder in `path` (default `model.path`): a Hugging
    Face directory or Hub id, a flexbert-train/-finetune run folder or Composer checkpoint.
    The classifier is new, unless the source is a fine-tuning run with the same label count
    (`load_pretrained`). `tokenizer` resolves ColBERT's marker and skiplist tokens."""
    from omegaconf import OmegaConf

    from flexbert import ConfigError
    from flexbert.train.checkpoints import VALID_SOURCES, load_pretrained, task_model_class
    from flexbert.train.finetune_retrieval import load_embedding_model

    path, task = path or cfg.model.get("path"), cfg.task
    if not path:
        raise ConfigError(f"model.path: set it to {VALID_SOURCES}")
    node = cfg.model.get("overrides")
    overrides = OmegaConf.to_container(node, resolve=True) if node else {}
    if task.type == "retrieval":
        return load_embedding_model(path, **overrides)  # type: ignore[arg-type]
    if task.type == "colbert":
        from flexbert.train.finetune_colbert import load_colbert_model

        return load_colbert_model(path, task, tokenizer, **overrides)  # type: ignore[arg-type]
    head = task_model_class(task.type)
    problem = {"regression": "regression", "sequence_classification": "single_label_classification"}
    return load_pretrained(
        path,
        head,
        num_labels=int(task.num_labels),
        problem_type=problem.get(task.type),
        **overrides,  # type: ignore[arg-type]
    )


def pretrained_tokenizer(cfg: Any, run: Any = None) -> Path:
    """Where the run's tokenizer comes from: `tokenizer.path`, else the model's own: the
    tokenizer of the run that wrote the checkpoint (`run`, from `find_run_checkpoint`), or
    the Hugging Face directory of `model.path` when there is no run."""
    from flexbert import ConfigError
    from flexbert.hf import resolve_model_dir
    from flexbert.train.checkpoints import VALID_SOURCES

    given = (cfg.get("tokenizer") or {}).get("path")
    if given:
        return Path(given)
    if not cfg.model.get("path"):
        raise ConfigError(f"model.path: set it to {VALID_SOURCES}")
    if run is None:
        return resolve_model_dir(cfg.model.path)
    if run.tokenizer is None:
        raise ConfigError(
            f"model.path={cfg.model.path}: no tokenizer/ in the run folder of "
            f"{run.checkpoint}, nor one named by its summary.json; set tokenizer.path"
        )
    return run.tokenizer


def composer_parts(
    task: Any, model: torch.nn.Module, pad_id: int, label_names: Sequence[str] | None = None
) -> tuple[ComposerModel, Any]:
    """The Composer wrapper and the batch collator for the task type."""
    from flexbert.train.finetune_qa import ComposerFlexBertQA, QACollator
    from flexbert.train.finetune_retrieval import ComposerFlexBertRetrieval
    from flexbert.train.retrieval_data import PairCollator
    from flexbert.train.tasks import ChoiceCollator, Collator

    if task.type == "question_answering":
        longest = int(task.get("max_answer_tokens", 30))
        no_answer = bool(task.get("allow_no_answer", False))
        wrapper = ComposerFlexBertQA(model, list(task.metrics), longest, no_answer)
        return wrapper, QACollator(pad_id)
    if task.type == "retrieval":
        gather = bool(task.get("gather_negatives", True))
        wrapper = ComposerFlexBertRetrieval(model, gather, list(task.metrics))
        return wrapper, PairCollator(pad_id)
    if task.type == "colbert":
        from flexbert.train.finetune_colbert import ComposerFlexBertColBERT

        gather = bool(task.get("gather_negatives", True))
        return ComposerFlexBertColBERT(model, gather, list(task.metrics)), PairCollator(pad_id)
    wrapper = ComposerFlexBertClassifier(model, task.type, list(task.metrics), label_names)
    if task.type == "multiple_choice":
        return wrapper, ChoiceCollator(pad_id)
    return wrapper, Collator(pad_id, regression=task.type == "regression")


def save_task_model(model: Any, tokenizer: Any, out: Path, task: Mapping[str, Any]) -> str | None:
    """HF directory with the fine-tuned model, tokenizer files and, when known, id2label
    (`task`: the run's task.json). Returns None, or why nothing was written: a model Hugging
    Face ModernBERT cannot express (an ablation such as rmsnorm); its weights stay in the
    run's Composer checkpoints.

    A sentence-embedding model is saved as its encoder (ModernBertModel, for AutoModel) with
    the sentence-transformers module files (`SentenceTransformer(out)`); a ColBERT model as
    its encoder with the projection and settings (`FlexBertForColBERT.from_pretrained(out)`)
    and PyLate's module files (`pylate.models.ColBERT(out)`, documents cut to the task's
    `document_length`).
    """
    from flexbert import ConfigError, FlexBertForColBERT
    from flexbert.colbert_pylate import write_pylate_modules
    from flexbert.data.tokenizer import save_tokenizer

    try:
        model.save_hf(out)
    except ConfigError as e:  # refused before anything is written
        return str(e)
    save_tokenizer(tokenizer, out, model.config.max_seq_len)
    write_label_names(out, task.get("labels"), model.config.num_labels)
    if isinstance(model, FlexBertForColBERT):
        length = task.get("document_length") or model.config.max_seq_len
        write_pylate_modules(out, model, tokenizer, length)
    return None


def write_label_names(out: Path, label_names: list[str] | None, num_labels: int) -> None:
    """id2label / label2id into a saved config.json (nothing when there are no names). Labels
    without a name (fewer names than the model's `num_labels`) are LABEL_i, as transformers
    names them: its config reads num_labels from id2label, so a short one would not load."""
    import json

    if not label_names:
        return
    names = [*label_names, *(f"LABEL_{i}" for i in range(len(label_names), num_labels))]
    cfg_file = Path(out) / "config.json"
    hf = json.loads(cfg_file.read_text())
    hf["id2label"] = {str(i): n for i, n in enumerate(names)}
    hf["label2id"] = {n: i for i, n in enumerate(names)}
    cfg_file.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
