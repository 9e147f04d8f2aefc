"""The workflow's parts other than systems and passes: input model, data configs, evaluators, engine.

Field names are Olive's, so Olive workflow files read as-is; where Olive has two spellings (older nested
"config"/"params" levels, newer flat ones) the reader flattens before these models see the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.schema.errors import field_names
from orchestrator.schema.resources import (
    LocalFile,
    LocalFolder,
    Resource,
    Strict,
    base_dir_of,
    parse_resource,
    resolve_path,
    resource_field,
)

MODEL_TYPES = {"pytorchmodel": "PyTorchModel", "hfmodel": "HfModel"}
DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})


def _files_kind(value: Any) -> str:
    if isinstance(value, str):
        return "path"
    if isinstance(value, list):
        return "paths"
    if isinstance(value, dict) and "type" not in value:  # Olive / datasets: {split: file or files}
        return "splits"
    return "resource"


# One path, several, or a resource; dispatched on the Python type so an error names only the form given.
DataFiles = Annotated[
    Annotated[str, Tag("path")]
    | Annotated[list[str], Tag("paths")]
    | Annotated[dict[str, str | list[str]], Tag("splits")]
    | Annotated[Resource, Tag("resource")],
    Discriminator(_files_kind),
]


class HfConfig(Strict):
    """Olive's hf_config: a hub id or local folder, and the kwargs for from_pretrained."""

    model_name: str | None = None
    task: str | None = None
    model_class: str | None = None
    model_loading_args: dict[str, Any] | None = None
    from_pretrained_args: dict[str, Any] | None = None


class InputModel(Strict):
    """The model the first pass starts from (PyTorchModel / HfModel)."""

    type: Literal["PyTorchModel", "HfModel"]
    model_path: Resource | None = None
    hf_config: HfConfig | None = None
    model_file_format: str | None = None
    task_name: str | None = Field(None, alias="task")  # read through .task (it also looks in hf_config)
    trust_remote_code_flag: bool | None = Field(None, alias="trust_remote_code")  # read through .trust_remote_code
    adapter_path: str | None = None  # a local PEFT adapter folder, resolved against the config's folder
    load_kwargs: dict[str, Any] | None = None
    model_attributes: dict[str, Any] | None = None
    _model_ref: Any = PrivateAttr(None)

    @field_validator("type", mode="before")
    @classmethod
    def _canonical_type(cls, v: Any) -> Any:
        return MODEL_TYPES.get(v.lower(), v) if isinstance(v, str) else v

    @field_validator("model_path", mode="before")
    @classmethod
    def _parse_path(cls, v: Any, info: ValidationInfo) -> Any:
        return resource_field(v, info, hub_ok=True)

    @field_validator("adapter_path", mode="after")
    @classmethod
    def _resolve_adapter(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else str(resolve_path(v, base_dir_of(info)))

    @model_validator(mode="after")
    def _locate(self, info: ValidationInfo) -> InputModel:
        if self.model_path is not None:
            self._model_ref = self.model_path
        elif self.hf_config is not None and self.hf_config.model_name:
            self._model_ref = parse_resource(self.hf_config.model_name, base_dir=base_dir_of(info), hub_ok=True)
        else:
            raise ValueError("no model given: set model_path or hf_config.model_name")
        revision = self._revision()
        if revision is not None:  # from_pretrained's revision: the hub commit, branch or tag to load
            if getattr(self._model_ref, "type", None) != "hf_hub":
                raise ValueError(f"revision {revision!r} applies to a hub model id, not to a local model folder")
            self._model_ref = self._model_ref.model_copy(update={"revision": str(revision)})
        return self

    def _revision(self) -> Any:
        places: list[dict[str, Any] | None] = [self.load_kwargs]
        if self.hf_config is not None:
            places += [self.hf_config.from_pretrained_args, self.hf_config.model_loading_args]
        return next((p["revision"] for p in places if p and p.get("revision") is not None), None)

    @property
    def model_ref(self) -> Any:
        """The resource holding the weights: model_path if given, else hf_config.model_name parsed."""
        return self._model_ref

    @property
    def task(self) -> str:
        """task, else hf_config.task, else text-generation."""
        return self.task_name or (self.hf_config.task if self.hf_config else None) or "text-generation"

    @property
    def trust_remote_code(self) -> bool:
        """True if any of Olive's places says so (top level, load_kwargs, hf_config's loading args)."""
        places: list[dict[str, Any] | None] = [self.load_kwargs]
        if self.hf_config is not None:
            places += [self.hf_config.model_loading_args, self.hf_config.from_pretrained_args]
        return bool(self.trust_remote_code_flag) or any(bool(p.get("trust_remote_code")) for p in places if p)


class _Params(Strict):
    @model_validator(mode="before")
    @classmethod
    def _unnest(cls, data: Any) -> Any:
        """Older Olive nests these fields under "params"; accept that and the flat form."""
        if isinstance(data, dict) and isinstance(data.get("params"), dict):
            return {**{k: v for k, v in data.items() if k != "params"}, **data["params"]}
        return data


class LoadDatasetConfig(_Params):
    """datasets.load_dataset arguments: data_name is a builder ("json") or a local folder/file or hub name."""

    type: str | None = None  # Olive's component name: a user_script's function, else informational
    data_name: str
    data_files: DataFiles | None = None
    data_dir: str | None = None
    subset: str | None = None
    revision: str | None = None  # a hub dataset's branch, tag or commit (datasets.load_dataset's revision)
    split: str | None = "train"
    col_filters: dict[str, str | int | float | bool] | None = None  # keep rows whose columns equal these values
    component_kwargs: dict[str, Any] = Field(default_factory=dict)  # a user_script function's own arguments

    @field_validator("data_name", mode="after")
    @classmethod
    def _resolve_name(cls, v: str, info: ValidationInfo) -> str:
        """A local folder/file resolves against the config's folder; builder and hub names stay."""
        if v in DATASET_BUILDERS:
            return v
        path = resolve_path(v, base_dir_of(info))
        return str(path) if path.exists() or v.startswith(("./", "../", "/", "~")) else v

    @field_validator("data_files", mode="before")
    @classmethod
    def _parse_files(cls, v: Any, info: ValidationInfo) -> Any:
        """Local paths become absolute strings; azureml URIs become resources (systems download/mount them).
        With a hub dataset as data_name they are paths inside its repo, kept as written."""
        from orchestrator.core.hub import is_dataset_id

        if is_dataset_id(info.data.get("data_name")):
            return v
        if isinstance(v, list):
            return [cls._one_file(x, info) for x in v]
        if isinstance(v, str):
            return cls._one_file(v, info)
        if isinstance(v, dict) and "type" not in v:
            return {k: cls._parse_files(x, info) for k, x in v.items()}
        return v

    @staticmethod
    def _one_file(v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, str):
            return v
        res = parse_resource(v, base_dir=base_dir_of(info))
        return str(res.path) if isinstance(res, LocalFolder | LocalFile) else res


MAX_SEQUENCE = 1 << 20  # tokens: beyond every model's context; padding rows to more cannot fit in memory


class PreProcessDataConfig(_Params):
    """Olive's text-generation pre-processing: how rows become one "text" column and how long sequences are."""

    type: str | None = None
    dataset_type: Literal["corpus"] = "corpus"
    text_cols: list[str] | None = None
    text_template: str | None = None
    corpus_strategy: Literal["join", "line-by-line", "join-random", "line-by-line-random", "join-sliding-window"] = (
        Field("line-by-line", validation_alias=AliasChoices("corpus_strategy", "strategy"))
    )  # orchestrator.passes.common.text_blocks packs them as Olive does
    stride: int | None = Field(None, gt=0, le=MAX_SEQUENCE)  # join-sliding-window's step
    source_max_len: int = Field(
        1024, gt=0, le=MAX_SEQUENCE, validation_alias=AliasChoices("source_max_len", "max_seq_len")
    )
    pad_to_max_len: bool = True
    use_attention_mask: bool = True
    max_samples: int | None = Field(None, gt=0)
    add_special_tokens: bool | None = None
    # Olive's chat form: each row's messages rendered with the tokenizer's chat template (True) or this Jinja one
    chat_template: bool | str | None = None
    message_col: str = "messages"

    random_seed: int | None = None  # Olive: the seed of its random strategies (required by them)
    component_kwargs: dict[str, Any] = Field(default_factory=dict)  # a user_script function's own arguments

    @field_validator("text_cols", mode="before")
    @classmethod
    def _one_col(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _strategy_needs(self) -> PreProcessDataConfig:
        """Olive's rules: random strategies need max_samples and random_seed, the sliding window a stride; a seed
        or stride another strategy would not read is refused rather than ignored."""
        random = "random" in self.corpus_strategy
        if random and (self.max_samples is None or self.random_seed is None):
            raise ValueError(
                f"strategy {self.corpus_strategy!r} draws sequences at random: set max_samples and random_seed"
            )
        if not random and self.random_seed is not None:
            raise ValueError(
                f"random_seed is read only by the random strategies (join-random, line-by-line-random), not "
                f"{self.corpus_strategy!r}; drop it or pick one of those"
            )
        if (self.corpus_strategy == "join-sliding-window") != (self.stride is not None):
            raise ValueError("stride goes with strategy 'join-sliding-window' (and it needs one)")
        return self

    @model_validator(mode="after")
    def _text_source(self) -> PreProcessDataConfig:
        if self.chat_template and self.text_template:
            raise ValueError("give chat_template or text_template, not both")
        if not self.text_cols and not self.text_template:  # Olive's default: the "text" column
            object.__setattr__(self, "text_cols", ["text"])
        return self


DUMMY_CONTAINERS = ("TransformersPromptDummyDataContainer", "TransformersTokenDummyDataContainer", "DummyDataContainer")
DataContainerType = Literal[
    "HuggingfaceContainer", "TransformersPromptDummyDataContainer", "TransformersTokenDummyDataContainer",
    "DummyDataContainer",
]  # fmt: skip


class DummyDataParams(_Params):
    """Olive's dummy containers (load_dataset_config params): random model inputs of fixed shapes, for latency.

    The transformers containers feed a decoder graph: input_ids (batch 1, seq_len), an all-ones attention mask
    over past + new tokens, position_ids, and past_seq_len positions of KV cache named ort_past_key_name /
    ort_past_value_name ("<id>" = the layer). Olive's defaults: prompt seq_len 8 / past 0, token seq_len 1 /
    past 8. DummyDataContainer feeds input_names with input_shapes / input_types as given.
    """

    type: str | None = None  # Olive's component name; informational
    seq_len: int | None = Field(None, gt=0)
    past_seq_len: int | None = Field(None, ge=0)
    max_seq_len: int = Field(2048, gt=0)
    max_samples: int = Field(32, gt=0)
    use_fp16: bool | None = None  # checked against the graph's KV dtype when the data is made
    ort_past_key_name: str = "past_key_values.<id>.key"
    ort_past_value_name: str = "past_key_values.<id>.value"
    model_name: str | None = None  # Olive reads the model's config from it; orch reads the graph + config.json
    model_framework: str | None = None
    trust_remote_code: bool | None = None
    shared_kv: bool = False
    generative: bool = False
    input_names: list[str] | None = None
    input_shapes: list[list[int]] | None = None
    input_types: list[str] | None = None

    @field_validator("shared_kv", "generative")
    @classmethod
    def _no_directml_buffers(cls, v: bool, info: ValidationInfo) -> bool:
        if v:
            raise ValueError(
                f"{info.field_name}: true is for Olive's DirectML LLM sample (shared KV buffers / generation "
                "loops); orch's dummy data feeds one forward pass; drop it"
            )
        return v

    @field_validator("model_framework")
    @classmethod
    def _onnx_only(cls, v: str | None) -> str | None:
        if v is not None and v.lower() != "onnx":
            raise ValueError(f"model_framework {v!r}: orch's dummy data feeds ONNX graphs only; drop it or use ONNX")
        return v

    @model_validator(mode="after")
    def _shapes_match(self) -> DummyDataParams:
        lists = [x for x in (self.input_names, self.input_shapes, self.input_types) if x is not None]
        if lists and len({len(x) for x in lists}) != 1:
            raise ValueError("input_names, input_shapes and input_types must have one entry per input")
        if self.input_shapes is not None and self.input_names is None:
            raise ValueError("input_shapes needs input_names (the graph inputs they feed)")
        return self


def _load_kind(v: Any) -> str:
    """A load_dataset_config of only dummy-container params (seq_len, ...) is one; anything else reads a data set
    (so a missing data_name is reported as such)."""
    if isinstance(v, dict):
        keys = (set(v) - {"params"} | set(v.get("params") or {})) - {"type"}
        return "dummy" if keys and keys <= set(DummyDataParams.model_fields) else "data"
    return "dummy" if isinstance(v, DummyDataParams) else "data"


class DataConfig(Strict):
    """One named data set: Olive's HuggingfaceContainer (rows of text), or one of its dummy containers."""

    name: str = Field(min_length=1)
    type: DataContainerType = "HuggingfaceContainer"
    load_dataset_config: (
        Annotated[
            Annotated[LoadDatasetConfig, Tag("data")] | Annotated[DummyDataParams, Tag("dummy")],
            Discriminator(_load_kind),
        ]
        | None
    ) = None
    pre_process_data_config: PreProcessDataConfig | None = None
    user_script: str | None = None
    script_dir: str | None = None

    @property
    def is_dummy(self) -> bool:
        return self.type in DUMMY_CONTAINERS

    @field_validator("type", mode="before")
    @classmethod
    def _canonical(cls, v: Any) -> Any:
        known = {t.lower(): t for t in ("HuggingfaceContainer", *DUMMY_CONTAINERS)}
        return known.get(v.lower(), v) if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _empty_dummy_params(cls, data: Any) -> Any:
        dummy = isinstance(data, dict) and cls._canonical(data.get("type")) in DUMMY_CONTAINERS
        if dummy and data.get("load_dataset_config") in ({}, {"params": {}}):
            return {k: v for k, v in data.items() if k != "load_dataset_config"}
        return data

    @model_validator(mode="after")
    def _load_config_of_type(self) -> DataConfig:
        """A dummy container's load_dataset_config holds shape params; a HuggingfaceContainer's a data set."""
        if self.is_dummy:
            if self.pre_process_data_config is not None:
                raise ValueError(f"{self.type} makes random inputs: pre_process_data_config does not apply; drop it")
            if isinstance(self.load_dataset_config, LoadDatasetConfig):
                raise ValueError(f"{self.type} makes random inputs: load_dataset_config.data_name does not apply")
            if self.load_dataset_config is None:
                object.__setattr__(self, "load_dataset_config", DummyDataParams())
        elif not isinstance(self.load_dataset_config, LoadDatasetConfig):
            raise ValueError("load_dataset_config.data_name is required for a HuggingfaceContainer (a data set)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _script_kwargs(cls, data: Any) -> Any:
        """With a user_script component named, the keys orch does not know are that function's arguments."""
        if not isinstance(data, dict) or not data.get("user_script"):
            return data
        from orchestrator.schema import user_script

        data = dict(data)
        for part, model, kind in _SCRIPT_PARTS:
            sub = data.get(part)
            if not isinstance(sub, dict):
                continue
            if isinstance(sub.get("params"), dict):
                sub = {**{k: v for k, v in sub.items() if k != "params"}, **sub["params"]}
            if sub.get("type") is None or sub["type"] in user_script.OLIVE_BUILTIN.get(kind, ()):
                continue
            known = field_names(model)
            extra = {k: v for k, v in sub.items() if k not in known}
            data[part] = {k: v for k, v in sub.items() if k in known}
            data[part]["component_kwargs"] = {**(sub.get("component_kwargs") or {}), **extra}
        return data

    @field_validator("user_script", "script_dir", mode="after")
    @classmethod
    def _script_path(cls, v: str | None, info: ValidationInfo) -> str | None:
        """Olive's user_script / script_dir, relative to the config's folder."""
        if v is None:
            return None
        path = resolve_path(v, base_dir_of(info))
        if info.field_name == "user_script" and not path.is_file():
            raise ValueError(f"file {str(path)!r} not found")
        if info.field_name == "script_dir" and not path.is_dir():
            raise ValueError(f"folder {str(path)!r} not found")
        return str(path)

    @model_validator(mode="after")
    def _script_components(self) -> DataConfig:
        """The components named must be the script's (loaded here: it runs where the config is read and in the
        job), and the arguments given must be ones the functions take."""
        if self.user_script is None or self.is_dummy:
            return self
        from orchestrator.schema import user_script

        try:
            user_script.load(self.user_script, self.script_dir)
        except user_script.UserScriptError as exc:
            raise ValueError(f"user_script: {exc}") from None
        for part, _, kind in _SCRIPT_PARTS:
            sub = getattr(self, part)
            if sub is None:
                continue
            try:
                fn = user_script.component(self.user_script, self.script_dir, kind, sub.type)
            except user_script.UserScriptError as exc:  # Olive < 0.7 wrote it as components.<kind>.type
                raise ValueError(f"{part}.type: {exc}") from None
            if fn is None:
                continue
            bad = user_script.unknown_args(fn, set(sub.component_kwargs), skip_first=kind != "load_dataset")
            if bad:
                raise ValueError(
                    f"{part}.{bad[0]}: {sub.type}() in {Path(self.user_script).name} takes no argument {bad[0]!r}"
                )
        return self

    def script_component(self, kind: str) -> Any:
        """The user_script function for "load_dataset" / "pre_process_data", or None (orch does that part)."""
        if self.user_script is None:
            return None
        from orchestrator.schema import user_script

        sub = self.load_dataset_config if kind == "load_dataset" else self.pre_process_data_config
        return user_script.component(self.user_script, self.script_dir, kind, getattr(sub, "type", None))


_SCRIPT_PARTS = (
    ("load_dataset_config", LoadDatasetConfig, "load_dataset"),
    ("pre_process_data_config", PreProcessDataConfig, "pre_process_data"),
)


class Goal(Strict):
    type: Literal[
        "threshold", "min-improvement", "percent-min-improvement", "max-degradation", "percent-max-degradation"
    ]
    value: float


class SubType(Strict):
    name: str
    priority: int = -1
    goal: Goal | None = None
    higher_is_better: bool | None = None
    metric_config: dict[str, Any] | None = None


class Metric(Strict):
    name: str
    type: Literal["accuracy", "latency", "throughput", "perplexity", "custom"]
    sub_types: list[SubType] = Field(default_factory=list)
    data_config: str | None = None  # the name of one of data_configs
    user_config: dict[str, Any] | None = None
    backend: str | None = None


class EvaluatorConfig(Strict):
    metrics: list[Metric] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _olive_evaluator_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and str(data.get("type", "")).lower() == "lmevaluator":
            raise ValueError(
                "Olive's LMEvaluator (lm-evaluation-harness tasks) is not supported: use an evaluator with "
                "metrics (perplexity, accuracy, latency, throughput)"
            )
        return data


class MlflowConfig(Strict):
    """orch addition: where metrics and the final model go."""

    tracking_uri: str | None = None
    experiment_name: str | None = None
    register_model_name: str | None = None


class PackagingConfig(Strict):
    """Olive's packaging_config entry: Zipfile is honoured (output_dir/<name>.zip of the published model/)."""

    type: Literal["Zipfile"]
    name: str = "OutputModel"
    config: dict[str, Any] | None = None


class EngineConfig(Strict):
    """How the workflow runs. Olive's search is not done: passes run once, in the order written."""

    host: str = "local"
    target: str = "local"
    cache_dir: Path = Path(".orch/cache")
    output_dir: Path | None = None
    log_severity_level: int = Field(1, ge=0, le=4)
    execution_providers: list[str] | None = None
    search_strategy: bool | dict[str, Any] | None = None
    evaluator: str | None = None
    clean_cache: bool = False
    evaluate_input_model: bool = False  # True: the evaluator also scores the input model (step evaluate_input)
    log_to_file: bool = False
    mlflow: MlflowConfig | None = None
    packaging_config: list[PackagingConfig] | None = None  # Olive: also a single entry

    @field_validator("packaging_config", mode="before")
    @classmethod
    def _one_package(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("cache_dir", "output_dir", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else resolve_path(v, base_dir_of(info))


class PassEntry(Strict):
    """One pass: its registry type name and its config (checked against the pass's Config when importable)."""

    type: str
    config: dict[str, Any] = Field(default_factory=dict)
