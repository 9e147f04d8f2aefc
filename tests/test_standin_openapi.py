"""The Azure stand-in's request-body check (tests/azure_standin/openapi) against Azure ML's OpenAPI definitions:
the real azure-ai-ml 1.35.2 bodies pass, bodies Azure ML would refuse get a 400 naming the property path."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests` is a namespace package: importable from the repo root
    sys.path.insert(0, str(REPO))

from tests.azure_standin import openapi  # noqa: E402
from tests.azure_standin import routes_control as rc  # noqa: E402
from tests.azure_standin.web import HttpError  # noqa: E402

WS = (
    "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/orch-rg/providers"
    "/Microsoft.MachineLearningServices/workspaces/orch-ws"
)
JOB_V = "2025-01-01-preview"  # what azure-ai-ml 1.35.2 sends for jobs PUT (request-log.json of test_standin)
ENV_V = "2023-04-01-preview"  # environments
CODE_V = "2023-04-01"  # codes + startPendingUpload
MODEL_V = "2023-08-01-preview"  # models
DS_V = "2024-10-01-preview"  # datastores listSecrets
RECORDED = Path(openapi.__file__).with_name("sdk-request-bodies-1.35.2.json")


def _wire(rest: Any) -> Any:
    """A REST model serialised exactly as the SDK's generated client puts it on the wire."""
    from azure.ai.ml._restclient.arm_ml_service._utils.model_base import SdkJSONEncoder

    return json.loads(json.dumps(rest, cls=SdkJSONEncoder, exclude_readonly=True))


def _job(**kw: Any) -> dict[str, Any]:
    from azure.ai.ml import Input, Output, command

    args: dict[str, Any] = dict(
        command="python main.py ${{inputs.data}} ${{outputs.out}}",
        environment=f"{WS}/environments/orch-env/versions/1",
        compute=f"{WS}/computes/cpu-cluster",
        inputs={"data": Input(type="uri_folder", path="azureml://datastores/workspaceblobstore/paths/datasets/tone/")},
        outputs={"out": Output(type="uri_folder")},
        environment_variables={"KV_URL": "https://orchkv.vault.localhost/"},
        experiment_name="standin-e2e",
    )
    args.update(kw)
    return _wire(command(**args)._to_job()._to_rest_object())


def _refusal(method: str, path: str, version: str, body: Any) -> str:
    with pytest.raises(HttpError) as info:
        openapi.check_request(method, path, version, body)
    assert info.value.status == 400 and info.value.code == "InvalidRequestContent"
    return info.value.message


def _ok(method: str, path: str, version: str, body: Any) -> None:
    assert openapi.find_operation(method, path, version) is not None, (method, path, version)
    openapi.check_request(method, path, version, body)


JOB = f"{WS}/jobs/musing_oyster_fqbty6hxst"
ENV = f"{WS}/environments/orch-env/versions/1"


# ---- the extracted schemas ---------------------------------------------------------------------------------------
def test_schemas_cover_every_body_route_and_record_their_source() -> None:
    spec = json.loads(openapi.SCHEMAS.read_text())
    assert spec["source"]["repo"] == "Azure/azure-rest-api-specs"
    for v, f in spec["source"]["files"].items():
        assert len(f["commit"]) == 40 and f["path"].endswith(f"/{v}/mfe.json")
    for v in rc.V_ASSET:
        for path in (f"{WS}/codes/c/versions/1", f"{WS}/environments/e", f"{WS}/models/m/versions/1",
                     f"{WS}/data/d/versions/1"):  # fmt: skip
            assert openapi.find_operation("PUT", path, v), (v, path)
        assert openapi.find_operation("POST", f"{WS}/codes/c/versions/1/startPendingUpload", v)
    for v in rc.V_JOB:
        assert openapi.find_operation("PUT", "/mferp/managementfrontend" + JOB, v), v
    for v in rc.V_DS:
        assert openapi.find_operation("POST", f"{WS}/datastores/workspaceblobstore/listSecrets", v)
    assert openapi.find_operation("GET", JOB, JOB_V) is None  # only bodies are checked
    assert openapi.SCHEMAS.stat().st_size < 400_000


# ---- (a) what the SDK sends passes -----------------------------------------------------------------------------
@pytest.mark.parametrize("recorded", json.loads(RECORDED.read_text())["bodies"], ids=lambda r: r["operationId"])
def test_bodies_recorded_from_test_standin_pass(recorded: dict[str, Any]) -> None:
    """Every distinct body azure-ai-ml 1.35.2 sent during tests/test_standin.py (recorded from its request log)."""
    op = openapi.find_operation(recorded["method"], recorded["path"], recorded["api_version"])
    assert op is not None and op["operationId"] == recorded["operationId"]
    openapi.check_request(recorded["method"], recorded["path"], recorded["api_version"], recorded["body"])


def test_sdk_job_bodies_pass() -> None:
    from azure.ai.ml import Input, MpiDistribution, Output, PyTorchDistribution, TensorFlowDistribution
    from azure.ai.ml.entities import AmlTokenConfiguration, JobService, ManagedIdentityConfiguration
    from azure.ai.ml.entities import UserIdentityConfiguration as User

    everything = _job(
        inputs={
            "data": Input(type="uri_folder", path="azureml://datastores/workspaceblobstore/paths/datasets/tone/"),
            "file": Input(type="uri_file", path="azureml://datastores/workspaceblobstore/paths/a", mode="download"),
            "model": Input(type="custom_model", path="azureml://registries/orch-registry/models/phi3/versions/1"),
            "mlflow": Input(type="mlflow_model", path="azureml:tone-merged:1"),
            "table": Input(type="mltable", path="azureml://datastores/workspaceblobstore/paths/t/", mode="direct"),
            "lr": 0.0002,
            "name": "tone",
        },
        outputs={"out": Output(type="uri_folder", mode="upload"), "merged": Output(type="custom_model")},
        instance_count=2, instance_type="Standard_NC24ads_A100_v4", shm_size="16g", docker_args="--ipc=host",
        distribution=PyTorchDistribution(process_count_per_instance=4), timeout=7200, tags={"run": "1"},
        display_name="lora", identity=ManagedIdentityConfiguration(client_id="00000000-0000-0000-0000-0000000000d1"),
        services={"tb": JobService(type="tensor_board", nodes="all")}, queue_settings={"job_tier": "standard"},
    )  # fmt: skip
    _ok("PUT", JOB, JOB_V, everything)
    assert everything["properties"]["inputs"]["lr"] == {"value": "0.0002", "jobInputType": "literal"}
    for extra in (
        dict(distribution=MpiDistribution(process_count_per_instance=2), identity=AmlTokenConfiguration()),
        dict(distribution=TensorFlowDistribution(worker_count=2, parameter_server_count=1), identity=User()),
        dict(command="python main.py", inputs={}, outputs={}, environment_variables={}),
    ):
        _ok("PUT", JOB, JOB_V, _job(**extra))
    for v in rc.V_JOB:  # the older previews the route also serves
        _ok("PUT", JOB, v, _job())


def test_sdk_asset_bodies_pass() -> None:
    from azure.ai.ml._restclient.arm_ml_service.models import PendingUploadRequestDto, SecretExpiry
    from azure.ai.ml.entities import BuildContext, Data, Environment, Model
    from azure.ai.ml.entities._assets._artifacts.code import Code

    envs = [
        Environment(name="e", image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
                    conda_file={"name": "orch", "dependencies": ["python=3.11", {"pip": ["mlflow==3.17.2"]}]},
                    description="d", tags={"a": "b"}),
        Environment(name="e", build=BuildContext(path="https://devstoreaccount1.blob.core.localhost/c/ctx/")),
    ]  # fmt: skip
    models = [Model(name="m", path="azureml://datastores/workspaceblobstore/paths/LocalUpload/x/merged",
                    type="custom_model", description="merged", tags={"k": "v"}, properties={"p": "q"})]  # fmt: skip
    data = [Data(name="d", path="azureml://datastores/workspaceblobstore/paths/datasets/tone/", type=t)
            for t in ("uri_folder", "uri_file", "mltable")]  # fmt: skip
    for v in rc.V_ASSET:
        for env in envs:
            _ok("PUT", ENV, v, _wire(env._to_rest_object()))
        for m in models:
            _ok("PUT", f"{WS}/models/m/versions/1", v, _wire(m._to_rest_object()))
        for d in data:
            _ok("PUT", f"{WS}/data/d/versions/1", v, _wire(d._to_rest_object()))
        code = Code(name="c", path="https://devstoreaccount1.blob.core.localhost/temp/src", is_anonymous=True)
        _ok("PUT", f"{WS}/codes/c/versions/1", v, _wire(code._to_rest_object()))
        _ok("POST", f"{WS}/codes/c/versions/1/startPendingUpload", v,
            _wire(PendingUploadRequestDto(pending_upload_type="TemporaryBlobReference")))  # fmt: skip
    _ok("POST", f"{WS}/datastores/workspaceblobstore/listSecrets", DS_V,
        _wire(SecretExpiry(expirable_secret=True, expire_after_hours=1)))  # fmt: skip


# ---- (b) what Azure ML would refuse is refused, naming the property path ---------------------------------------------
def test_command_job_without_command() -> None:
    body = _job()
    del body["properties"]["command"]
    msg = _refusal("PUT", JOB, JOB_V, body)
    assert "Path 'properties.command'" in msg and "Required property 'command'" in msg


def test_unknown_job_type() -> None:
    body = _job()
    body["properties"]["jobType"] = "Nope"
    msg = _refusal("PUT", JOB, JOB_V, body)
    assert "Path 'properties.jobType'" in msg and '"Nope"' in msg and "'Command'" in msg


def test_uri_folder_input_without_uri() -> None:
    body = _job()
    del body["properties"]["inputs"]["data"]["uri"]
    assert body["properties"]["inputs"]["data"] == {"jobInputType": "uri_folder"}
    assert "Path 'properties.inputs.data.uri'" in _refusal("PUT", JOB, JOB_V, body)


def test_instance_count_of_the_wrong_type() -> None:
    body = _job(instance_count=2)
    body["properties"]["resources"]["instanceCount"] = "two"
    msg = _refusal("PUT", JOB, JOB_V, body)
    assert "Path 'properties.resources.instanceCount'" in msg and "integer" in msg


def test_environment_conda_file_as_an_object() -> None:
    from azure.ai.ml.entities import Environment

    body = _wire(Environment(name="e", image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest")
                 ._to_rest_object())  # fmt: skip
    body["properties"]["condaFile"] = {"name": "orch", "dependencies": ["python=3.11"]}
    for v in rc.V_ASSET:
        assert "Path 'properties.condaFile'" in _refusal("PUT", ENV, v, body)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda p: p.update(instanceCount=2), "properties.instanceCount"),  # wrong nesting: not under resources
        (lambda p: p["inputs"]["data"].update(jobInputType="uri_foldr"), "properties.inputs.data.jobInputType"),
        (lambda p: p["outputs"]["out"].pop("jobOutputType"), "properties.outputs.out.jobOutputType"),
        (lambda p: p.update(distribution={"processCountPerInstance": 2}), "properties.distribution.distributionType"),
        (lambda p: p.update(identity={"identityType": "Robot"}), "properties.identity.identityType"),
        (lambda p: p.update(isArchived=None), "properties.isArchived"),  # a non-nullable boolean
        (lambda p: p.update(environmentVariables={"A": {"nested": 1}}), "properties.environmentVariables.A"),
        (lambda p: p.update(command=""), "properties.command"),  # minLength 1
        (lambda p: p.update(resources={"shmSize": "lots"}), "properties.resources.shmSize"),  # pattern
        (lambda p: p.update(inputs=["data"]), "properties.inputs"),
        (lambda p: p.update(limits={"jobLimitsType": "Command", "timeout": 3600}), "properties.limits.timeout"),
    ],
    ids=str.split(
        "nesting input-type output-type distribution identity null env-map minLength pattern map-type duration"
    ),
)
def test_more_refusals_name_the_path(change: Any, path: str) -> None:
    body = _job()
    change(body["properties"])
    assert f"Path '{path}'" in _refusal("PUT", JOB, JOB_V, body)


def test_every_violation_is_listed() -> None:
    body = _job()
    del body["properties"]["command"]
    body["properties"]["inputs"]["data"].pop("uri")
    msg = _refusal("PUT", JOB, JOB_V, body)
    assert "properties.command" in msg and "properties.inputs.data.uri" in msg
    assert _refusal("PUT", JOB, JOB_V, {"command": "python main.py"}).count("Path '") == 2  # no envelope


# ---- Swagger specifics honoured -----------------------------------------------------------------------------
def test_read_only_properties_are_ignored() -> None:
    body = _job()
    body["properties"].update(status="Running", parameters={"x": 1}, services={"Studio": {"status": "up"}})
    body.update(id="/whatever", name="n", type="t", systemData={"createdAt": "yesterday"})
    _ok("PUT", JOB, JOB_V, body)
    env = {"properties": {"image": "i", "provisioningState": 42, "environmentType": "Curated"}}
    _ok("PUT", ENV, ENV_V, env)


def test_model_as_string_enums_accept_new_values_and_nullables_accept_null() -> None:
    body = _job()
    body["properties"]["inputs"]["data"]["mode"] = "SomeFutureMode"  # InputDeliveryMode: modelAsString
    body["properties"]["queueSettings"] = {"jobTier": "Ultra"}  # JobTier: modelAsString
    body["properties"].update(codeId=None, displayName=None, distribution=None, identity=None)  # x-nullable
    body["properties"]["environmentVariables"]["B"] = None  # x-nullable map values
    _ok("PUT", JOB, JOB_V, body)


def test_formats_check_the_json_type_only() -> None:
    body = _job()
    body["properties"]["identity"] = {"identityType": "Managed", "clientId": "not-a-uuid"}  # format: uuid
    body["properties"]["limits"] = {"jobLimitsType": "Command", "timeout": "not a duration"}  # format: duration
    _ok("PUT", JOB, JOB_V, body)
    body["properties"]["identity"]["clientId"] = 7
    assert "Path 'properties.identity.clientId'" in _refusal("PUT", JOB, JOB_V, body)


def test_discriminator_picks_the_subtype_and_unchecked_subtypes_pass() -> None:
    body = _job()
    body["properties"]["inputs"]["n"] = {"jobInputType": "literal", "value": "3"}
    body["properties"]["inputs"]["m"] = {"jobInputType": "literal", "uri": "x"}  # uri is not a literal's member
    msg = _refusal("PUT", JOB, JOB_V, body)
    assert "Path 'properties.inputs.m.uri'" in msg and "Path 'properties.inputs.m.value'" in msg
    # A Sweep job is a known subtype the stand-in does not check (its handler refuses non-Command jobs).
    _ok("PUT", JOB, JOB_V, {"properties": {"jobType": "Sweep", "anything": 1}})


def test_property_names_and_closed_enums_match_case_insensitively() -> None:
    body = _job()
    body["properties"]["Command"] = body["properties"].pop("command")
    _ok("PUT", JOB, JOB_V, body)
    _ok("PUT", ENV, "2023-04-01", {"properties": {"image": "i", "osType": "BeOS"}})  # modelAsString
    # Every enum these operations reach is modelAsString; a closed one (none today) is checked, ignoring case:
    checker = openapi._Checker({"Os": {"type": "string", "enum": ["Linux", "Windows"],
                                       "x-ms-enum": {"name": "Os", "modelAsString": False}}})  # fmt: skip
    errors: list[str] = []
    for value in ("linux", "WINDOWS", "BeOS"):
        checker.check(value, {"$ref": "#/definitions/Os"}, "properties.osType", errors)
    assert errors == ["Value \"BeOS\" is not one of ['Linux', 'Windows'] (Os). Path 'properties.osType'."]


def test_unchecked_requests() -> None:
    openapi.check_request("PUT", JOB, "1999-01-01", {"junk": True})  # an api-version with no schemas
    openapi.check_request("POST", f"{WS}/jobs/x/cancel", JOB_V, None)  # no body parameter
    openapi.check_request("PUT", "/nothing/here", JOB_V, {"junk": True})  # not an extracted operation
    assert "request body is required" in _refusal("PUT", JOB, JOB_V, None)


# ---- findings: what the spec says of bodies the SDK can send ---------------------------------------------------
def test_finding_code_version_properties_hash_version_is_an_integer() -> None:
    """azure-ai-ml 1.35.2 sends `properties.properties.hash_version` as the integer 202208 on the code version PUT,
    where ResourceBase.properties is a string map (the service's Dictionary<string, string> binder converts it).
    Accepted in string maps only; a string-typed property still refuses a number."""
    recorded = [
        r for r in json.loads(RECORDED.read_text())["bodies"] if r["operationId"] == "CodeVersions_CreateOrUpdate"
    ]
    assert recorded and recorded[0]["body"]["properties"]["properties"]["hash_version"] == 202208
    _ok("PUT", f"{WS}/codes/c/versions/1", CODE_V, recorded[0]["body"])
    body = copy.deepcopy(recorded[0]["body"])
    body["properties"]["codeUri"] = 202208
    assert "Path 'properties.codeUri'" in _refusal("PUT", f"{WS}/codes/c/versions/1", CODE_V, body)
    body["properties"]["codeUri"], body["properties"]["properties"]["x"] = "https://a/b", {"not": "scalar"}
    assert "Path 'properties.properties.x'" in _refusal("PUT", f"{WS}/codes/c/versions/1", CODE_V, body)


def test_finding_sdk_features_the_2025_01_01_preview_spec_lacks() -> None:
    """Bodies the SDK builds for features test_standin does not use, refused by the 2025-01-01-preview spec: an
    output with name+version sends `assetVersion` (AssetJobOutput has assetName, mode, uri only) and a Ray
    distribution sends distributionType "Ray" (DistributionType: PyTorch, TensorFlow, Mpi). Azure ML may differ
    from its spec here; orch uses neither."""
    from azure.ai.ml import Output

    msg = _refusal("PUT", JOB, JOB_V, _job(outputs={"out": Output(type="uri_folder", name="tone", version="3")}))
    assert "Path 'properties.outputs.out.assetVersion'" in msg
    msg = _refusal("PUT", JOB, JOB_V, _job(distribution={"type": "ray", "port": 6379}))
    assert "Path 'properties.distribution.distributionType'" in msg


# ---- the hook in the stand-in ------------------------------------------------------------------------------
def test_stand_in_answers_400_and_records_the_refusal(tmp_path: Path) -> None:
    from tests.azure_standin import StandIn
    from tests.azure_standin.web import Ctx

    s = StandIn(tmp_path)  # not started: handle() is called directly
    headers = {"authorization": f"Bearer {s.mlflow_token()}"}
    body = _job()
    del body["properties"]["command"]
    resp = s.handle(Ctx(s, "PUT", JOB, {"api-version": JOB_V}, headers, json.dumps(body).encode()))
    assert resp is not None and resp.status == 400
    assert resp.body["error"]["code"] == "InvalidRequestContent"
    assert "Path 'properties.command'" in resp.body["error"]["message"]
    assert s.state.refused_bodies == [
        {"method": "PUT", "path": JOB, "api_version": JOB_V, "why": resp.body["error"]["message"]}
    ]
    assert s.state.unknown_requests == []  # a refused body is a legitimate answer, not an unknown request
    good = {"properties": {"image": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"}}
    resp = s.handle(Ctx(s, "PUT", ENV, {"api-version": ENV_V}, headers, json.dumps(good).encode()))
    assert resp is not None and "InvalidRequestContent" not in json.dumps(resp.body)
    assert len(s.state.refused_bodies) == 1
