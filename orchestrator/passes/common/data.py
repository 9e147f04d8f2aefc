"""Data configs -> datasets.Dataset splits with one templated "text" column, ready for training/evaluation.

The `datasets` library does the loading (json/csv/parquet files, or a folder it autodetects) and the split
syntax ("train[:80%]"); this module adds Olive's text_template / text_cols rendering, the eval carve-out
(eval_dataset_size) and one-line errors that name the data config, the path or the column at fault.
`datasets` is imported inside functions: the registry and `orch --help` must not pay for it.
"""

from __future__ import annotations

import glob
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.core.hub import is_dataset_id
from orchestrator.core.prompt import TEMPLATE_FIELD, PromptFormat
from orchestrator.passes.base import PassError
from orchestrator.passes.common.dummy_data import dummy_inputs  # noqa: F401  (the dummy containers' inputs live there)
from orchestrator.schema.errors import translate
from orchestrator.schema.models import DATASET_BUILDERS, DataConfig, PreProcessDataConfig
from orchestrator.schema.resources import LocalFile, LocalFolder, resolve_path

SUFFIX_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}
_FIELD = TEMPLATE_FIELD

# The calibration sets Olive's passes load when their config names no data_config, read from the hub as there:
# Olive >= 0.10's get_calibration_data_config (Gptq, GptqQuantizer, SelectiveMixedPrecision): wikitext-2-raw-v1
# train; AutoAWQ's (AutoAWQQuantizer) "pileval": mit-han-lab/pile-val-backup, its validation split.
WIKITEXT2_TRAIN: dict[str, Any] = {
    "name": "wikitext2_train",
    "type": "HuggingfaceContainer",
    "load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1", "split": "train"},
    "pre_process_data_config": {"text_cols": ["text"]},
}
PILE_VAL: dict[str, Any] = {
    "name": "pile_val_backup",
    "type": "HuggingfaceContainer",
    "load_dataset_config": {"data_name": "mit-han-lab/pile-val-backup", "split": "validation"},
    "pre_process_data_config": {"text_cols": ["text"]},
}


def describe_data(data_config: dict[str, Any]) -> str:
    """"Salesforce/wikitext wikitext-2-raw-v1, split train": a hub data config in a note line."""
    load = data_config["load_dataset_config"]
    subset = f" {load['subset']}" if load.get("subset") else ""
    return f"{load['data_name']}{subset}, split {load.get('split', 'train')}"


class DataError(PassError):
    """A data config that cannot be loaded as written: one line naming the data config and the fix."""


@dataclass(frozen=True)
class TextDataSpec:
    """What the trainer needs from pre_process_data_config beyond the text itself."""

    max_len: int = 1024  # source_max_len
    pad_to_max_len: bool = True
    corpus_join: bool = False  # a join strategy: texts concatenated into one token stream before cutting
    use_attention_mask: bool = True
    strategy: str = "line-by-line"  # Olive's corpus strategy (orchestrator.passes.common.text_blocks packs it)
    max_samples: int | None = None  # sequences the random strategies draw
    random_seed: int | None = None
    stride: int | None = None  # join-sliding-window
    add_special_tokens: bool | None = None  # None: the tokenizer's BOS + an EOS after each text (orch's default)
    chat: bool = False  # rendered by a chat template, which carries its own special tokens


def text_spec(data_config: dict[str, Any]) -> TextDataSpec:
    """The sequence settings of a data config (json form or Olive's nested form)."""
    raw = data_config.get("pre_process_data_config")
    if not raw:
        return TextDataSpec()
    pre = PreProcessDataConfig.model_validate(raw)
    return TextDataSpec(
        max_len=pre.source_max_len,
        pad_to_max_len=pre.pad_to_max_len,
        corpus_join=pre.corpus_strategy.startswith("join"),
        use_attention_mask=pre.use_attention_mask,
        strategy=pre.corpus_strategy,
        max_samples=pre.max_samples,
        random_seed=pre.random_seed,
        stride=pre.stride,
        add_special_tokens=pre.add_special_tokens,
        chat=bool(pre.chat_template),
    )


def load_splits(
    data_config: dict[str, Any],
    *,
    base_dir: Path | None,
    eval_dataset_size: float | int | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    seed: int = 42,
    data_files_override: str | None = None,
    tokenizer: str | None = None,
) -> tuple[Any, Any | None]:
    """(train, eval or None), each a datasets.Dataset with only a "text" column.

    `train_split`/`eval_split` override the config's split ("train[:80%]" syntax). Without eval_split,
    `eval_dataset_size` (a fraction < 1, or a row count) is carved out of train with train_test_split(seed).
    `data_files_override` is the local path a system put the data at (a downloaded datastore file, a mount).
    `tokenizer` (a model folder) renders rows with its chat template when the config asks for chat_template.
    """
    dc = _parse(data_config, base_dir)
    if dc.is_dummy:
        raise DataError(
            f"data config {dc.name!r} is a {dc.type} (random token ids, for latency metrics): it has no text to "
            "train or score on; name a HuggingfaceContainer here"
        )
    train = _load(dc, train_split or dc.load_dataset_config.split or "train", base_dir, data_files_override)
    train, pre = _script_pre_process(dc, train)
    if pre is not None and pre.max_samples is not None and "random" not in pre.corpus_strategy:
        train = train.select(range(min(pre.max_samples, len(train))))  # random strategies draw max_samples later
    train = render_text(train, pre, dc.name, tokenizer=tokenizer)
    eval_ds = None
    if eval_split:
        eval_raw, _ = _script_pre_process(dc, _load(dc, eval_split, base_dir, data_files_override))
        eval_ds = render_text(eval_raw, pre, dc.name, tokenizer=tokenizer)
    elif eval_dataset_size:
        train, eval_ds = _carve(train, eval_dataset_size, seed, dc.name)
    return train, eval_ds


def _parse(data_config: dict[str, Any], base_dir: Path | None) -> DataConfig:
    if isinstance(data_config, BaseModel):
        data_config = data_config.model_dump(mode="json")
    try:
        return DataConfig.model_validate(data_config, context={"base_dir": base_dir})
    except ValidationError as exc:
        name = data_config.get("name", "?") if isinstance(data_config, dict) else "?"
        raise DataError(f"data config {name!r}: " + "; ".join(translate(exc, DataConfig))) from None


def _source(dc: DataConfig, base_dir: Path | None, override: str | None) -> dict[str, Any]:
    """load_dataset kwargs: a builder + data_files/data_dir, or a folder/hub name that datasets resolves."""
    load = dc.load_dataset_config
    name = load.data_name
    files: Any = load.data_files
    if override:
        local = resolve_path(override, base_dir)
        if local.is_dir() and is_dataset_id(name):  # a hub dataset's snapshot: data_files / data_dir inside it
            return {"path": str(local), **({"data_files": files} if files else {}),
                    **({"data_dir": load.data_dir} if load.data_dir else {})}  # fmt: skip
        if local.is_dir():
            return {"path": name, "data_dir": str(local)} if name in DATASET_BUILDERS else {"path": str(local)}
        files = str(local)
    if isinstance(files, LocalFile | LocalFolder):
        files = str(files.path)
    elif isinstance(files, BaseModel):
        raise DataError(
            f"data config {dc.name!r}: data_files is {getattr(files, 'uri', files)!r}, a remote resource: the "
            "system must download or mount it and pass its local path (Job.data_files)"
        )
    if is_dataset_id(name):  # read from the hub where the job runs (the engine hands a snapshot over instead)
        return {"path": name, **({"data_files": files} if files else {}),
                **({"data_dir": load.data_dir} if load.data_dir else {}),
                **({"revision": load.revision} if load.revision else {})}  # fmt: skip
    if files is None:
        path = Path(name)
        if name in DATASET_BUILDERS:
            raise DataError(f"data config {dc.name!r}: data_name {name!r} needs data_files (the file(s) to read)")
        if path.is_absolute() and not path.exists():
            raise DataError(f"data config {dc.name!r}: data_name {name!r} not found")
        if path.is_file():
            return {"path": SUFFIX_BUILDERS.get(path.suffix.lower(), "json"), "data_files": str(path)}
        return {"path": name, **({"data_dir": load.data_dir} if load.data_dir else {})}
    # relative files: against the config's folder, or (as datasets does) inside a local data_name folder
    roots = [base_dir] + ([Path(name)] if Path(name).is_dir() else [])

    def local(f: str) -> str:
        rel = Path(f)
        if base_dir is not None and rel.is_absolute() and rel.is_relative_to(base_dir):  # resolved by the reader
            rel = rel.relative_to(base_dir)
        for root in roots:
            cand = str(resolve_path(rel, root))
            if glob.glob(cand, recursive=True) if glob.has_magic(cand) else Path(cand).exists():
                return cand
        raise DataError(f"data config {dc.name!r}: data file {str(resolve_path(f, base_dir))!r} not found")

    def each(v: Any) -> Any:
        return local(v) if isinstance(v, str) else [local(f) for f in v]

    files = {split: each(v) for split, v in files.items()} if isinstance(files, dict) else each(files)
    flat = (
        [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
        if isinstance(files, dict)
        else ([files] if isinstance(files, str) else files)
    )
    suffixes = Path(flat[0].removesuffix(".gz").removesuffix(".zst")).suffix.lower()
    builder = name if name in DATASET_BUILDERS else SUFFIX_BUILDERS.get(suffixes, "json")
    return {"path": builder, "data_files": files}


def _load(dc: DataConfig, split: str, base_dir: Path | None, override: str | None) -> Any:
    import datasets

    script_fn = dc.script_component("load_dataset")
    if script_fn is not None:
        return _script_load(dc, script_fn, split, override)
    kwargs = _source(dc, base_dir, override)
    if kwargs["path"] == "json" and "data_files" in kwargs:
        kwargs["data_files"] = _columns_as_rows(kwargs["data_files"], dc.name)
    if dc.load_dataset_config.subset:
        kwargs["name"] = dc.load_dataset_config.subset
    try:
        ds = datasets.load_dataset(**kwargs, split=split)
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data config {dc.name!r}: split {split!r}: {first}") from None
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ArrowInvalid)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data config {dc.name!r}: cannot load {kwargs['path']!r}: {first}") from None
    if isinstance(ds, datasets.DatasetDict):  # split=None in the config: take train
        ds = ds["train"]
    filters = dc.load_dataset_config.col_filters
    if filters:  # Olive's col_filters: rows whose columns equal the given values
        missing = [c for c in filters if c not in ds.column_names]
        if missing:
            raise DataError(
                f"data config {dc.name!r}: col_filters names column(s) {', '.join(missing)} that the data does not "
                f"have (columns: {', '.join(ds.column_names)})"
            )
        ds = ds.filter(lambda row: all(row[c] == v for c, v in filters.items()), desc=f"col_filters {dc.name}")
    return ds


COLUMNAR_LIMIT = 512 << 20  # bytes: a mapping-of-columns JSON is parsed whole to turn it into rows


def _columns_as_rows(files: Any, name: str) -> Any:
    """datasets reads a JSON document that maps column names to lists as ONE row of lists; Olive's users write
    such files as columns. Each such file is rewritten as JSON lines (a temp copy) so its rows are rows."""
    if isinstance(files, dict):
        return {split: _columns_as_rows(v, name) for split, v in files.items()}
    if isinstance(files, list):
        return [_columns_as_rows(f, name) for f in files]
    path = Path(files)
    if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > COLUMNAR_LIMIT:
        return files
    with path.open(encoding="utf-8-sig") as fh:
        if not fh.read(4096).lstrip().startswith("{"):
            return files
        fh.seek(0)
        try:
            data = json.load(fh)
        except ValueError:
            return files  # datasets names the problem
    if not (isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values())):
        return files
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"data config {name!r}: {path} maps columns of unequal length ({lengths}); one value a row")
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="orch-columns-")
    atexit.register(shutil.rmtree, folder, True)  # the job's process reads it; nothing is left behind
    out = Path(folder) / f"{path.stem}.jsonl"
    n = next(iter(lengths.values()))
    with out.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({k: v[i] for k, v in data.items()}, ensure_ascii=False) + "\n")
    return str(out)


def _as_dataset(out: Any, dc: DataConfig, what: str) -> Any:
    """A user_script component's result as a datasets.Dataset (a DatasetDict's train split, a list of rows)."""
    import datasets

    if isinstance(out, datasets.DatasetDict) and "train" in out:
        out = out["train"]
    if isinstance(out, list) and all(isinstance(r, dict) for r in out):
        out = datasets.Dataset.from_list(out)
    if not isinstance(out, datasets.Dataset):
        raise DataError(
            f"data config {dc.name!r}: user_script {what} returned {type(out).__name__}; orch needs a "
            "datasets.Dataset (or a list of row dicts) of text columns"
        )
    return out


def _script_call(dc: DataConfig, fn: Any, what: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the script's own failure: one line naming the function, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"data config {dc.name!r}: user_script {what} {fn.__name__}() failed: {type(exc).__name__}: {first}"
        ) from None


def _script_load(dc: DataConfig, fn: Any, split: str, override: str | None = None) -> Any:
    """Olive's DataContainer.load_dataset: fn(**params), params = the load config's fields its signature names
    + its own arguments (component_kwargs). A hub data_name arrives as the snapshot folder the engine downloaded
    (load_dataset reads it as it would the hub repo), so the job needs no hub."""
    from orchestrator.schema.user_script import call_args

    load = dc.load_dataset_config
    fields = {k: v for k, v in load.model_dump().items() if k not in ("type", "component_kwargs") and v is not None}
    if isinstance(load.data_files, LocalFile | LocalFolder):
        fields["data_files"] = str(load.data_files.path)
    if override and is_dataset_id(load.data_name) and Path(override).is_dir():
        fields["data_name"] = str(override)
    fields["split"] = split
    kwargs = call_args(fn, {**fields, **load.component_kwargs}, skip_first=False)
    return _as_dataset(_script_call(dc, fn, "load_dataset", **kwargs), dc, "load_dataset")


def _script_pre_process(dc: DataConfig, ds: Any) -> tuple[Any, PreProcessDataConfig | None]:
    """Olive's DataContainer.pre_process: fn(dataset, **params). orch still renders the "text" column after it;
    a text_template / text_cols the function takes is its own (not applied again)."""
    from orchestrator.schema.user_script import call_args

    pre = dc.pre_process_data_config
    fn = dc.script_component("pre_process_data")
    if fn is None or pre is None:
        return ds, pre
    fields = {k: v for k, v in pre.model_dump().items() if k not in ("type", "component_kwargs") and v is not None}
    kwargs = call_args(fn, {**fields, **pre.component_kwargs}, skip_first=True)
    out = _as_dataset(_script_call(dc, fn, "pre_process_data", ds, **kwargs), dc, "pre_process_data")
    if {"text_template", "text_cols"} & set(kwargs):
        pre = pre.model_copy(update={"text_template": None, "text_cols": ["text"]})
    return out, pre


def prompt_format(data_config: dict[str, Any], source: str = "") -> PromptFormat:
    """The format the training texts of a data config have (recorded beside the model for generation)."""
    dc = _parse(data_config, None)
    pre = dc.pre_process_data_config
    if pre is None or dc.script_component("pre_process_data") is not None:  # a script builds the text itself
        return PromptFormat(kind="text", source=source)
    chat = getattr(pre, "chat_template", None)  # rows of messages through a chat template
    if chat:
        return PromptFormat(kind="chat_template", template=chat if isinstance(chat, str) else None, source=source)
    if pre.text_template:
        return PromptFormat(kind="text_template", template=pre.text_template, source=source)
    if pre.text_cols and len(pre.text_cols) > 1:
        return PromptFormat(kind="text_cols", columns=list(pre.text_cols), source=source)
    return PromptFormat(kind="text", columns=list(pre.text_cols or []), source=source)


def template_columns(template: str) -> list[str]:
    """The column names a text_template refers to. "{Best Answer}" names the column "Best Answer". A brace that
    opens or closes no field is an error (str.format would refuse it; rendering it as text would train on the
    template's own braces): a literal brace is written twice, "{{" or "}}"."""
    cols: list[str] = []
    pos = 0
    for m in _FIELD.finditer(template):
        _no_stray_brace(template, pos, m.start())
        pos = m.end()
        inner = m.group(1)
        if inner is None:
            continue
        if not inner.strip():
            raise ValueError("text_template has an empty {} field: name a column, e.g. {prompt}")
        cols.append(inner)
    _no_stray_brace(template, pos, len(template))
    return cols


def _no_stray_brace(template: str, start: int, end: int) -> None:
    for i in range(start, end):
        if template[i] in "{}":
            near = template[max(0, i - 12) : i + 13].replace("\n", "\\n")
            which = "opens no closed field" if template[i] == "{" else "closes no field"
            raise ValueError(
                f"text_template has an unbalanced {template[i]!r} at character {i + 1} (near {near!r}) that {which}; "
                "write {column} for a field, or double it ('{{' / '}}') for a literal brace"
            )


def _render(template: str, row: dict[str, Any]) -> str:
    """str.format over the row, where a whole {...} that is a column name wins (names may hold spaces or ':')."""

    def field(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        inner = m.group(1)
        if inner in row:
            value = row[inner]
            return "" if value is None else str(value)
        return ("{" + inner + "}").format_map(row)

    return _FIELD.sub(field, template)


def _base_name(inner: str, columns: list[str]) -> str:
    """The column a field needs: itself if it is a column, else the name before format spec / attribute."""
    if inner in columns:
        return inner
    try:
        parsed = next(string.Formatter().parse("{" + inner + "}"))[1] or ""
    except ValueError:
        return inner
    return re.split(r"[.\[]", parsed, maxsplit=1)[0]


# Row shapes that are a conversation without a messages column, as (user columns, assistant column): Alpaca,
# Dolly, prompt/response and question/answer data sets. The first whose columns a row has is used.
INSTRUCTION_FORMS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("instruction", "input"), "output"),
    (("instruction", "context"), "response"),
    (("prompt",), "response"),
    (("prompt",), "completion"),
    (("question",), "answer"),
    (("Question",), "Answer"),
    (("input",), "output"),
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def row_messages(row: dict[str, Any], message_col: str, columns: list[str]) -> list[dict[str, str]] | None:
    """A row as chat messages: its message column ({role, content} dicts), ShareGPT `conversations`
    ({from, value}), or instruction data (INSTRUCTION_FORMS: user = the prompt columns, assistant = the answer)."""
    value = row.get(message_col)
    if value is None and message_col == "messages" and "conversations" in row:
        value = row["conversations"]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = []
        for m in value:
            role = m.get("role") or _SHAREGPT_ROLES.get(str(m.get("from", "")).lower())
            content = m.get("content", m.get("value"))
            if role is None or content is None:
                return None
            out.append({"role": str(role), "content": str(content)})
        return out
    for prompt_cols, answer_col in INSTRUCTION_FORMS:
        if prompt_cols[0] in columns and answer_col in columns:
            prompt = "\n\n".join(str(row[c]) for c in prompt_cols if c in columns and row.get(c) not in (None, ""))
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[answer_col] or "")}]
    return None


def _chat_text(ds: Any, pre: PreProcessDataConfig, name: str, tokenizer: str | None) -> Any:
    """Olive's chat_template: each row's messages through the tokenizer's chat template (or a given one)."""
    if tokenizer is None:
        raise DataError(
            f"data config {name!r}: chat_template needs the model's tokenizer, which this pass does not load; give "
            "text_template or text_cols"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    custom = pre.chat_template if isinstance(pre.chat_template, str) else None
    if custom is None and not getattr(tok, "chat_template", None):
        raise DataError(
            f"data config {name!r}: the tokenizer of {tokenizer} has no chat template: give one (chat_template: "
            "'<jinja>') or a text_template instead of --use_chat_template"
        )
    columns = list(ds.column_names)
    first = ds[0] if len(ds) else {}
    if len(ds) and row_messages(first, pre.message_col, columns) is None:
        raise DataError(
            f"data config {name!r}: chat_template needs chat rows: a {pre.message_col!r} column of "
            "{role, content} messages, ShareGPT 'conversations', or instruction columns (instruction/input/output, "
            f"prompt/response, question/answer); the data has {', '.join(columns)}"
        )

    def to_text(row: dict[str, Any]) -> dict[str, str]:
        messages = row_messages(row, pre.message_col, columns) or []
        return {"text": tok.apply_chat_template(messages, tokenize=False, chat_template=custom)}

    return ds.map(to_text, remove_columns=columns, desc=f"chat template {name}")


def render_text(ds: Any, pre: PreProcessDataConfig | None, name: str, *, tokenizer: str | None = None) -> Any:
    """ds -> a Dataset with only "text": the chat template over the row's messages (chat_template), the
    text_template over the row, else text_cols joined by newlines."""
    if pre is not None and pre.chat_template:
        return _chat_text(ds, pre, name, tokenizer)
    columns = list(ds.column_names)
    if pre is None:
        if "text" not in columns:
            raise DataError(
                f"data config {name!r}: no pre_process_data_config and no 'text' column (columns: "
                f"{', '.join(columns)}); add text_cols or text_template"
            )
        return ds.select_columns(["text"])
    try:
        fields = template_columns(pre.text_template) if pre.text_template else []
    except ValueError as exc:
        raise DataError(f"data config {name!r}: {exc}") from None
    needed = [_base_name(f, columns) for f in fields] + ([] if pre.text_template else list(pre.text_cols or []))
    for col in needed:
        if col not in columns:
            what = "text_template names" if pre.text_template else "text_cols names"
            raise DataError(
                f"data config {name!r}: {what} column {col!r} that the data does not have "
                f"(columns: {', '.join(columns)})"
            )
    template, cols = pre.text_template, list(pre.text_cols or [])

    def to_text(row: dict[str, Any]) -> dict[str, str]:
        if template:
            return {"text": _render(template, row)}
        return {"text": "\n".join("" if row[c] is None else str(row[c]) for c in cols)}

    try:
        return ds.map(to_text, remove_columns=columns, desc=f"templating {name}")
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        raise DataError(f"data config {name!r}: text_template cannot be applied: {exc}") from None


def _carve(train: Any, size: float | int, seed: int, name: str) -> tuple[Any, Any]:
    """Split eval rows off train: size < 1 is a fraction, size >= 1 a row count."""
    n = len(train)
    if size < 0:
        raise DataError(f"data config {name!r}: eval_dataset_size must be > 0, got {size!r}")
    test_size: float | int = float(size) if size < 1 else int(size)
    if (isinstance(test_size, int) and test_size >= n) or n < 2:
        raise DataError(
            f"data config {name!r}: eval_dataset_size {size!r} leaves no training rows ({n} rows in the split)"
        )
    parts = train.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
