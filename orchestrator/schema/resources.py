"""Where bytes live: local paths, Azure ML registry/workspace models and datastore paths, Hugging Face names.

Olive writes a resource either as a typed dict (`{"type": "azureml_registry_model", "config": {...}}`, or flat) or
as a string (`azureml://registries/<r>/models/<n>/versions/<v>`, `azureml://datastores/<d>/paths/<p>`,
`azureml:<name>:<version>`, a local path). Both forms parse to the same model here, so systems see one shape.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REGISTRY_URI = re.compile(r"^azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)/?$")
DATASTORE_URI = re.compile(
    r"^azureml://(?:subscriptions/([^/]+)/resource[gG]roups/([^/]+)/workspaces/([^/]+)/)?datastores/([^/]+)/paths/(.+)$"
)
WORKSPACE_MODEL = re.compile(r"^azureml:([^:@/]+)(?::([^:@]+)|@([^:@]+))?$")


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors (the reader names the nearest valid key); numbers are
    finite (`1e999` reads as inf) and never booleans (`lora_r: true` is not 1)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)


FIELD_PREFIX = "field "  # "field 'x': msg" from a model-level check: schema.errors.translate puts x in the path


def refuse_bool_numbers(model: type[BaseModel], data: Any) -> Any:
    """A boolean given where a field takes numbers and not booleans: pydantic would read `true` as 1."""
    if not isinstance(data, dict):
        return data
    for name, info in model.model_fields.items():
        keys = [name, info.alias] + list(getattr(info.validation_alias, "choices", None) or [info.validation_alias])
        for key in dict.fromkeys(k for k in keys if isinstance(k, str)):
            value = data.get(key)
            if isinstance(value, bool):
                kinds = _scalar_kinds(info.annotation)
                if bool not in kinds and kinds & {int, float}:
                    what = "a whole number" if float not in kinds else "a number"
                    raise ValueError(f"{FIELD_PREFIX}{key!r}: expected {what}, got {str(value).lower()} (a boolean)")
    return data


def _scalar_kinds(annotation: Any) -> set[Any]:
    """The plain types a field annotation admits (Optional / Annotated / unions / Literal looked through)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if annotation is typing.Any:
        return {bool, int, float}
    return {annotation} if isinstance(annotation, type) else set()


def base_dir_of(info: ValidationInfo | None) -> Path | None:
    ctx = info.context if info is not None else None
    return ctx.get("base_dir") if isinstance(ctx, dict) else None


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """~ expanded; relative paths against the config file's folder (or the working directory)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return Path(_normpath(path))


def _normpath(path: Path) -> str:
    import os

    return os.path.normpath(str(path))


class AzureMLClient(Strict):
    """Olive's azureml_client: which workspace (and Key Vault) to talk to."""

    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    keyvault_name: str | None = None
    aml_config_path: str | None = None
    read_timeout: int | None = None
    max_operation_retries: int | None = None
    operation_retry_interval: int | None = None
    default_auth_params: dict[str, Any] | None = None


class _Resource(Strict):
    @model_validator(mode="before")
    @classmethod
    def _unnest(cls, data: Any) -> Any:
        """Olive nests the fields under "config"; accept that and the flat form."""
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            inner = dict(data["config"])
            rest = {k: v for k, v in data.items() if k != "config"}
            return {**rest, **inner}
        return data


class LocalFolder(_Resource):
    type: Literal["local_folder"] = "local_folder"
    path: Path

    @field_validator("path", mode="after")
    @classmethod
    def _resolve(cls, v: Path, info: ValidationInfo) -> Path:
        return resolve_path(v, base_dir_of(info))

    @property
    def uri(self) -> str:
        return str(self.path)


class LocalFile(LocalFolder):
    type: Literal["local_file"] = "local_file"  # type: ignore[assignment]


class AzureMLRegistryModel(_Resource):
    type: Literal["azureml_registry_model"] = "azureml_registry_model"
    name: str
    registry_name: str
    version: str

    @field_validator("version", mode="before")
    @classmethod
    def _str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @property
    def uri(self) -> str:
        return f"azureml://registries/{self.registry_name}/models/{self.name}/versions/{self.version}"


class AzureMLModel(_Resource):
    """A model registered in a workspace (`azureml:<name>:<version>` or `azureml:<name>@<label>`)."""

    type: Literal["azureml_model"] = "azureml_model"
    azureml_client: AzureMLClient | None = None
    name: str
    version: str | None = None
    label: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _one_of(self) -> AzureMLModel:
        if (self.version is None) == (self.label is None):
            raise ValueError("give exactly one of version or label (e.g. label 'latest')")
        return self

    @property
    def uri(self) -> str:
        return f"azureml:{self.name}:{self.version}" if self.version else f"azureml:{self.name}@{self.label}"


class AzureMLDatastore(_Resource):
    """A file or folder in a workspace datastore (`azureml://datastores/<ds>/paths/<p>`)."""

    type: Literal["azureml_datastore"] = "azureml_datastore"
    azureml_client: AzureMLClient | None = None
    datastore_name: str
    relative_path: str

    @property
    def uri(self) -> str:
        c = self.azureml_client
        if c and c.subscription_id and c.resource_group and c.workspace_name:
            return (
                f"azureml://subscriptions/{c.subscription_id}/resourcegroups/{c.resource_group}/workspaces/"
                f"{c.workspace_name}/datastores/{self.datastore_name}/paths/{self.relative_path}"
            )
        return f"azureml://datastores/{self.datastore_name}/paths/{self.relative_path}"


class HfHubModel(_Resource):
    """A Hugging Face hub id (`microsoft/Phi-3-mini-4k-instruct`): only usable where a hub is reachable."""

    type: Literal["hf_hub"] = "hf_hub"
    name: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        return self.name


Resource = Annotated[
    LocalFolder | LocalFile | AzureMLRegistryModel | AzureMLModel | AzureMLDatastore | HfHubModel,
    Field(discriminator="type"),
]
REMOTE_TYPES = frozenset({"azureml_registry_model", "azureml_model", "azureml_datastore"})
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Resource)


def parse_resource(value: Any, *, base_dir: Path | None = None, hub_ok: bool = False) -> Any:
    """A resource dict or string -> the Resource model it names; raises ValueError on a malformed URI.

    Strings: azureml:// URIs and azureml:name:version parse to their kind; anything else is a local path
    (relative to `base_dir`), except, with `hub_ok`, a name like `org/model` that does not exist locally and
    does not start with ./ ../ / or ~ (Olive's hf_config.model_name / HfModel model_path may be a hub id).
    """
    if isinstance(value, BaseModel):
        return value
    if isinstance(value, dict):
        return _ADAPTER.validate_python(value, context={"base_dir": base_dir})
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a path, an azureml URI or a resource dict, got {value!r}")
    value = value.strip()
    if value.startswith("azureml://registries/"):
        m = REGISTRY_URI.match(value)
        if not m:
            raise ValueError(f"{value!r}: expected azureml://registries/<registry>/models/<name>/versions/<version>")
        return AzureMLRegistryModel(registry_name=m[1], name=m[2], version=m[3])
    if value.startswith("azureml://"):
        m = DATASTORE_URI.match(value)
        if not m:
            raise ValueError(
                f"{value!r}: expected azureml://datastores/<datastore>/paths/<path> or "
                "azureml://registries/<registry>/models/<name>/versions/<version>"
            )
        client = None
        if m[1]:
            client = AzureMLClient(subscription_id=m[1], resource_group=m[2], workspace_name=m[3])
        return AzureMLDatastore(azureml_client=client, datastore_name=m[4], relative_path=m[5])
    if value.startswith("azureml:"):
        m = WORKSPACE_MODEL.match(value)
        if not m:
            raise ValueError(f"{value!r}: expected azureml:<name>:<version> or azureml:<name>@<label>")
        if not (m[2] or m[3]):
            raise ValueError(f"{value!r}: give a version (azureml:{m[1]}:<version>) or a label (azureml:{m[1]}@latest)")
        return AzureMLModel(name=m[1], version=m[2], label=m[3])
    if re.match(r"^[a-z][a-z0-9+.-]*://", value):
        raise ValueError(f"{value!r}: unsupported URI scheme (use a local path, azureml://... or azureml:name:version)")
    path = resolve_path(value, base_dir)
    explicit_local = value.startswith(("./", "../", "/", "~", ".\\")) or Path(value).is_absolute()
    if hub_ok and not explicit_local and not path.exists() and HUB_NAME.match(value):
        return HfHubModel(name=value)
    if path.is_file() or (not path.exists() and path.suffix):
        return LocalFile(path=path)
    return LocalFolder(path=path)


def resource_field(value: Any, info: ValidationInfo, *, hub_ok: bool = False) -> Any:
    """For `mode="before"` field validators: strings and dicts -> Resource, relative to the config's folder."""
    if value is None or isinstance(value, BaseModel):
        return value
    if isinstance(value, dict):
        return value  # validated by the field's discriminated union, with precise error paths
    return parse_resource(value, base_dir=base_dir_of(info), hub_ok=hub_ok)
