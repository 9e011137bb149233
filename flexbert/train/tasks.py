"""Fine-tuning data: read a task's splits, check its fields and labels, tokenize, pad batches.

Sources (the `task.dataset` node): local files (`files: {train: a.csv, validation: b.csv}`;
CSV, TSV, JSON/JSONL, Parquet by extension), a `datasets` directory saved with
`save_to_disk` (`path`), or a Hub dataset by name (`name` + `config`). Every problem found in
the data raises DataError naming the file, split or field, before any training starts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flexbert.data.errors import DataError, DataFileNotFoundError
from flexbert.heads import IGNORE_INDEX

TASK_TYPES = (
    "sequence_classification",
    "regression",
    "token_classification",
    "multiple_choice",
    "question_answering",
    "retrieval",
    "colbert",
)
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# only an empty cell is missing: "NA", "nan" or "null" in a CSV/TSV cell stay text (pandas' default
# would read them as missing); TSV has no quoting, so a '"' is text, not the start of a field
CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}
TSV_OPTIONS = {**CSV_OPTIONS, "delimiter": "\t", "quoting": csv.QUOTE_NONE}


def _file_format(files: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The `datasets` builder for these files (one format for all splits) and its options."""
    suffixes = set()
    for split, f in files.items():
        p = Path(f)
        if not p.exists():
            raise DataFileNotFoundError(f"task.dataset.files.{split}: file not found: {p}")
        if p.suffix.lower() not in FORMATS:
            raise DataError(f"{p}: unknown format '{p.suffix}'; use one of {sorted(FORMATS)}")
        suffixes.add(p.suffix.lower())
    builders = {FORMATS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"task.dataset.files mixes formats {sorted(suffixes)}; use one format")
    builder = builders.pop()
    if builder != "csv":
        return builder, {}
    return builder, TSV_OPTIONS if suffixes == {".tsv"} else CSV_OPTIONS


def load_splits(dataset: Mapping[str, Any], splits: Sequence[str]) -> dict[str, Any]:
    """{split: datasets.Dataset} for the requested splits, from files, disk or the Hub."""
    import datasets

    files = {k: str(v) for k, v in (dataset.get("files") or {}).items() if v}
    path, name = dataset.get("path"), dataset.get("name")
    try:
        if files:
            builder, options = _file_format(files)
            loaded = datasets.load_dataset(builder, data_files=files, **options)
        elif path:
            if not Path(path).exists():
                raise DataFileNotFoundError(f"task.dataset.path: not found: {path}")
            loaded = datasets.load_from_disk(str(path))
        elif name:
            loaded = datasets.load_dataset(name, dataset.get("config"))
        else:
            raise DataError("task.dataset: set files (local files), path (load_from_disk) or name")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one clear message
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise DataError(f"could not load task.dataset ({files or path or name}): {e}{cause}") from e
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise DataError(
            f"dataset has no split(s) {missing}; it has {sorted(loaded)} (give each a file: "
            f"task.dataset.files.<split>=..., or pick others: task.train_split / task.eval_split)"
        )
    return {s: loaded[s] for s in splits}


def check_fields(
    ds: Any, fields: Sequence[str], split: str, option: str = "task.text_fields / task.label_field"
) -> None:
    """A DataError naming the missing fields, the `option` that asked for them and the
    split's fields."""
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(
            f"split '{split}' has no field(s) {missing} ({option}); "
            f"its fields are {ds.column_names}"
        )


def text_column(values: Sequence[Any], split: str, field: str, blank_ok: bool = False) -> list[str]:
    """A text field's values as strings; a missing (null, empty cell) or, unless `blank_ok`,
    blank text is an error naming its split, row and field, not the text "None"."""
    for row, value in enumerate(values):
        if value is None or (not blank_ok and isinstance(value, str) and not value.strip()):
            raise DataError(
                f"split '{split}' row {row}: field '{field}' is empty (null, missing or blank); "
                "every row needs a text there"
            )
    return [str(v) for v in values]


def _missing(value: Any) -> bool:
    """No label: null, NaN (an empty numeric cell) or a blank string."""
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def feature_label_names(ds: Any, field: str) -> list[str] | None:
    """The names of a `datasets` ClassLabel column (or a sequence of ClassLabel), if it is one."""
    feature = (getattr(ds, "features", None) or {}).get(field)
    inner = getattr(feature, "feature", feature)  # Sequence / List(ClassLabel) -> ClassLabel
    names = getattr(inner, "names", None)
    return list(names) if names else None


def label_mapper(
    task: Mapping[str, Any], values: Sequence[Any], known_names: Sequence[str] | None = None
) -> tuple[Any, list[str] | None]:
    """A function raw label -> target, and the label names (for id2label) when known: from
    task.label_names, else `known_names` (a ClassLabel column's), else string labels."""
    kind, num_labels = task["type"], int(task["num_labels"])
    field = task.get("label_field", "label")

    def check(v: Any, valid: str) -> None:
        if _missing(v):
            raise DataError(
                f"no label in field '{field}' (an empty cell, null, or no such column in the "
                f"split's file); every row needs {valid}"
            )

    def to_float(v: Any) -> float:
        check(v, "a number")
        try:
            return float(v)
        except (TypeError, ValueError):
            raise DataError(f"label {v!r} in field '{field}' is not a number") from None

    if kind == "regression":
        return to_float, None
    names = list(task.get("label_names") or known_names or [])
    if not names and any(isinstance(v, str) for v in values):
        names = sorted({str(v) for v in values if not _missing(v)})  # ids in sorted order,
        if kind == "token_classification" and "O" in names:  # but the outside tag is id 0
            names = ["O", *[n for n in names if n != "O"]]
    if len(names) > num_labels:
        raise DataError(f"{len(names)} labels {names} but task.num_labels={num_labels}")
    index = {n: i for i, n in enumerate(names)}
    valid = f"one of {names}" if names else f"a class id 0..{num_labels - 1}"

    def to_id(v: Any) -> int:
        check(v, valid)
        if isinstance(v, str) and names:
            if v not in index:
                raise DataError(f"label '{v}' is not one of task.label_names {names}")
            i = index[v]
        elif isinstance(v, float) and not v.is_integer():
            raise DataError(f"label {v!r} in field '{field}' is not a whole number; need {valid}")
        else:
            try:
                i = int(v)
            except (TypeError, ValueError):
                raise DataError(f"label {v!r} in field '{field}' is not {valid}") from None
        if not 0 <= i < num_labels:
            raise DataError(
                f"label {v!r} is outside task.num_labels={num_labels} (0..{num_labels - 1})"
            )
        return i

    return to_id, names or None


def read_labels(values: Sequence[Any], to_label: Any, where: str, item: str = "row") -> list[Any]:
    """Each value's target; a bad label's DataError says where (`where`, then its row, or the
    `item` it labels) it is."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(to_label(v))
        except DataError as e:
            raise DataError(f"{where} {item} {i}: {e}") from None
    return out


def encode_sequences(
    ds: Any, task: Mapping[str, Any], tokenizer: Any, max_len: int, split: str, to_label: Any
) -> list[dict[str, Any]]:
    """One or two text fields -> input_ids (CLS a SEP [b SEP]), truncated to max_len."""
    fields = list(task["text_fields"])
    if not 1 <= len(fields) <= 2:
        raise DataError(f"task.text_fields: one or two fields, got {fields}")
    check_fields(ds, [*fields, task["label_field"]], split)
    # a blank text is still text (GLUE's QQP has empty questions); a missing one is not
    columns = [text_column(ds[f], split, f, blank_ok=True) for f in fields]
    enc = tokenizer(*columns, truncation=True, max_length=max_len)
    labels = read_labels(ds[task["label_field"]], to_label, f"split '{split}'")
    return [{"input_ids": ids, "labels": y} for ids, y in zip(enc["input_ids"], labels)]


def check_word_lists(ds: Any, task: Mapping[str, Any], split: str) -> None:
    """Token classification reads a list of words and a list of labels (one per word) in
    each row; a plain string or one label per row is refused naming the field."""
    fields = {task["text_fields"][0]: "words", task["label_field"]: "labels, one per word"}
    for field, what in fields.items():
        for row, value in enumerate(ds[field]):
            if not isinstance(value, (list, tuple)):
                raise DataError(
                    f"split '{split}' row {row}: field '{field}' holds {value!r} "
                    f"({type(value).__name__}); token classification expects a list of {what} "
                    f"in each row (task.text_fields[0] = words, task.label_field = labels), "
                    f'e.g. {{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}}'
                )


def encode_tokens(
    ds: Any, task: Mapping[str, Any], tokenizer: Any, max_len: int, split: str, to_label: Any
) -> list[dict[str, Any]]:
    """Word lists -> sub-tokens; each word's label sits on its first sub-token, others -100."""
    words_field, label_field = task["text_fields"][0], task["label_field"]
    check_fields(ds, [words_field, label_field], split)
    check_word_lists(ds, task, split)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = []
    for row, (words, tags) in enumerate(zip(ds[words_field], ds[label_field])):
        if len(words) != len(tags):
            raise DataError(f"split '{split}' row {row}: {len(words)} words but {len(tags)} labels")
        ids, labels = [cls], [IGNORE_INDEX]
        targets = read_labels(tags, to_label, f"split '{split}' row {row}", "word")
        for i, (word, y) in enumerate(zip(words, targets)):
            if word is None:  # not the text "None"
                raise DataError(
                    f"split '{split}' row {row} word {i}: null in field '{words_field}'; every "
                    "word must be a text"
                )
            pieces = tokenizer(str(word) if i == 0 else " " + str(word), add_special_tokens=False)
            pieces = pieces["input_ids"] or [tokenizer.unk_token_id or sep]
            ids += pieces
            labels += [y] + [IGNORE_INDEX] * (len(pieces) - 1)
        ids, labels = ids[: max_len - 1] + [sep], labels[: max_len - 1] + [IGNORE_INDEX]
        out.append({"input_ids": ids, "labels": labels})
    return out


def encode_choices(
    ds: Any, task: Mapping[str, Any], tokenizer: Any, max_len: int, split: str, to_label: Any
) -> list[dict[str, Any]]:
    """text_fields = [context, choice_1, ..., choice_C] -> C rows of (CLS context SEP choice
    SEP) per example; `task.choice_prefix` (a field, e.g. SWAG's sent2) starts every choice."""
    context, *choices = list(task["text_fields"])
    if len(choices) < 2:
        raise DataError(
            f"task.text_fields: multiple choice needs [context, choice_1, choice_2, ...], got "
            f"{[context, *choices]}"
        )
    if int(task["num_labels"]) != len(choices):
        raise DataError(
            f"task.num_labels={task['num_labels']} must equal the number of choice fields "
            f"({len(choices)}: {choices})"
        )
    prefix = task.get("choice_prefix")
    check_fields(ds, [context, *choices, task["label_field"], *([prefix] if prefix else [])], split)
    contexts = text_column(ds[context], split, context)  # each column read once (a copy)
    columns = [text_column(ds[f], split, f) for f in choices]
    n = len(contexts)
    starts = [t + " " for t in text_column(ds[prefix], split, prefix, True)] if prefix else [""] * n
    firsts = [c for c in contexts for _ in choices]
    seconds = [starts[i] + column[i] for i in range(n) for column in columns]
    ids = tokenizer(firsts, seconds, truncation=True, max_length=max_len)["input_ids"]
    labels = read_labels(ds[task["label_field"]], to_label, f"split '{split}'")
    k = len(choices)
    return [{"input_ids": ids[i * k : (i + 1) * k], "labels": labels[i]} for i in range(n)]


def build_examples(
    task: Mapping[str, Any], tokenizer: Any, max_len: int
) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None]:
    """{train, eval: encoded examples} and the label names, from the task config."""
    kind = task["type"]
    if kind not in TASK_TYPES:
        raise DataError(f"task.type '{kind}' is not one of {list(TASK_TYPES)}")
    names = {"train": task["train_split"], "eval": task["eval_split"]}
    raw = load_splits(task["dataset"], list(dict.fromkeys(names.values())))
    if kind == "retrieval":
        from flexbert.train.retrieval_data import encode_pairs

        out = {
            k: encode_pairs(raw[s], task, tokenizer, max_len, s, for_training=k == "train")
            for k, s in names.items()
        }
        return out, None
    if kind == "colbert":
        from flexbert.train.finetune_colbert import encode_colbert_pairs

        out = {
            k: encode_colbert_pairs(raw[s], task, tokenizer, max_len, s, for_training=k == "train")
            for k, s in names.items()
        }
        return out, None
    if kind == "question_answering":
        from flexbert.train.finetune_qa import encode_questions

        out = {
            k: encode_questions(raw[s], task, tokenizer, max_len, s, for_eval=k == "eval")
            for k, s in names.items()
        }
        return _non_empty(out, names), None
    train = raw[names["train"]]
    check_fields(train, [task["label_field"]], names["train"])
    values = train[task["label_field"]]
    if kind == "token_classification":
        check_fields(train, [task["text_fields"][0]], names["train"])
        check_word_lists(train, task, names["train"])
        values = [v for tags in values for v in tags]
    to_label, label_names = label_mapper(
        task, values, feature_label_names(train, task["label_field"])
    )
    encode = {"token_classification": encode_tokens, "multiple_choice": encode_choices}.get(
        kind, encode_sequences
    )
    out = {k: encode(raw[s], task, tokenizer, max_len, s, to_label) for k, s in names.items()}
    return _non_empty(out, names), label_names


def _non_empty(out: dict[str, list], names: Mapping[str, str]) -> dict[str, list]:
    for key, split in names.items():
        if not out[key]:
            raise DataError(f"split '{split}' is empty")
    return out


def pad_rows(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, longest) ids padded with pad_id and the (B, longest) 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


class Collator:
    """Dynamic padding: each batch is padded to its longest row (labels with -100 per token)."""

    def __init__(self, pad_id: int, regression: bool = False) -> None:
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([r["input_ids"] for r in rows], self.pad_id)
        width = ids.shape[1]
        first = rows[0]["labels"]
        if isinstance(first, list):
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        else:
            dtype = torch.float if self.regression else torch.long
            labels = torch.tensor([r["labels"] for r in rows], dtype=dtype)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ChoiceCollator:
    """Multiple choice: (batch, choices, longest row) ids and mask, one label per example."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        choices = len(rows[0]["input_ids"])
        width = max(len(c) for r in rows for c in r["input_ids"])
        ids = torch.full((len(rows), choices, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), choices, width), dtype=torch.long)
        for i, r in enumerate(rows):
            for j, c in enumerate(r["input_ids"]):
                ids[i, j, : len(c)] = torch.tensor(c)
                mask[i, j, : len(c)] = 1
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
