"""infra/azure/main.bicep, checked by real parsers rather than by grep.

pycep-parser turns the Bicep into a dict (a syntax error fails it: see the broken-copy test), and the resources and
their wiring are asserted on that dict; then checkov scans infra/azure offline and no check may fail except the ones
skipped in main.bicep itself, each with its reason. Both tools live in .venv-infra (scripts/setup-infra.sh, which
scripts/test.sh runs first): their pins clash with the main .venv's, so they are called as subprocesses. A missing
.venv-infra fails these tests (it never skips them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra" / "azure"
BICEP = INFRA / "main.bicep"
VENV_INFRA = ROOT / ".venv-infra" / "bin"

DATA_SCIENTIST = "f6c7c914-8db3-469d-8ca1-694a8f32e121"  # built-in "AzureML Data Scientist"
KV_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
SKIP_RE = re.compile(r"^\s*//\s*checkov:skip=(CKV2?_[A-Z]+_\d+):(.*)$", re.M)

PARSE = """
import json, sys
from pathlib import Path
from pycep import BicepParser
print(json.dumps(BicepParser().parse(file_path=Path(sys.argv[1])), default=str))
"""


def _tool(name: str) -> Path:
    path = VENV_INFRA / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash scripts/setup-infra.sh` (installs pycep-parser and checkov "
                    "into .venv-infra; `make test` does it)", pytrace=False)
    return path


def _pycep(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_tool("python")), "-c", PARSE, str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONNOUSERSITE": "1"})


@pytest.fixture(scope="module")
def bicep() -> dict[str, Any]:
    proc = _pycep(BICEP)
    assert proc.returncode == 0, f"pycep-parser rejected {BICEP}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def _body(res: dict[str, Any]) -> dict[str, Any]:
    """A resource's own config; a conditional one (`= if (...) {...}`) nests it under config.config."""
    cfg = res["config"]
    return cfg["config"] if "condition" in cfg else cfg


def _ref(value: Any) -> str | None:
    """`x.id` in the Bicep -> 'x.id' (pycep writes a property accessor as an operator)."""
    if isinstance(value, dict) and value.get("operator", {}).get("type") == "property_accessor":
        ops = value["operator"]["operands"]
        if isinstance(ops["operand_2"], str):
            return f"{ops['operand_1']}.{ops['operand_2']}"
    return None


def _of_type(bicep: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in bicep["resources"].items() if r["type"] == rtype}


def _one(bicep: dict[str, Any], rtype: str) -> tuple[str, dict[str, Any]]:
    found = _of_type(bicep, rtype)
    assert len(found) == 1, f"expected one {rtype}, found {sorted(found)}"
    return next(iter(found.items()))


def _role_id(bicep: dict[str, Any], body: dict[str, Any]) -> str:
    fn = body["properties"]["roleDefinitionId"]["function"]
    assert fn["type"] == "subscription_resource_id"
    assert fn["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
    return bicep["variables"][fn["parameters"]["resource_name_1"]]["value"]


def test_bicep_parses_into_the_expected_resources(bicep: dict[str, Any]) -> None:
    types = {r["type"] for r in bicep["resources"].values()}
    for rtype in ("Microsoft.MachineLearningServices/workspaces",
                  "Microsoft.MachineLearningServices/workspaces/computes",
                  "Microsoft.Storage/storageAccounts", "Microsoft.KeyVault/vaults",
                  "Microsoft.ContainerRegistry/registries", "Microsoft.OperationalInsights/workspaces",
                  "Microsoft.Insights/components", "Microsoft.Authorization/roleAssignments"):
        assert rtype in types, f"{rtype} missing from main.bicep"
    for out in ("subscription_id", "resource_group", "workspace_name", "compute", "key_vault_url"):
        assert out in bicep["outputs"], out


def test_storage_is_flat_namespace_and_locked_down(bicep: dict[str, Any]) -> None:
    _, storage = _one(bicep, "Microsoft.Storage/storageAccounts")
    props = _body(storage)["properties"]
    assert props["isHnsEnabled"] is False  # the choice of README.md "Storage namespace", set explicitly
    assert props["supportsHttpsTrafficOnly"] is True
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["allowBlobPublicAccess"] is False


def test_key_vault_uses_rbac_and_soft_delete(bicep: dict[str, Any]) -> None:
    _, kv = _one(bicep, "Microsoft.KeyVault/vaults")
    props = _body(kv)["properties"]
    assert props["enableRbacAuthorization"] is True
    assert props["enableSoftDelete"] is True


def test_app_insights_is_workspace_based_and_wired_to_the_ml_workspace(bicep: dict[str, Any]) -> None:
    law_name, _ = _one(bicep, "Microsoft.OperationalInsights/workspaces")
    ai_name, ai = _one(bicep, "Microsoft.Insights/components")  # one component: no classic one left over
    ai_body = _body(ai)
    assert ai_body["kind"] == "web"
    assert ai_body["properties"]["Application_Type"] == "web"
    assert _ref(ai_body["properties"]["WorkspaceResourceId"]) == f"{law_name}.id"
    assert ai_body["properties"]["IngestionMode"] == "LogAnalytics"
    _, ws = _one(bicep, "Microsoft.MachineLearningServices/workspaces")
    ws_props = _body(ws)["properties"]
    assert _ref(ws_props["applicationInsights"]) == f"{ai_name}.id"
    names = {rtype: _one(bicep, rtype)[0] for rtype in ("Microsoft.Storage/storageAccounts",
                                                         "Microsoft.KeyVault/vaults",
                                                         "Microsoft.ContainerRegistry/registries")}
    assert _ref(ws_props["storageAccount"]) == f"{names['Microsoft.Storage/storageAccounts']}.id"
    assert _ref(ws_props["keyVault"]) == f"{names['Microsoft.KeyVault/vaults']}.id"
    assert _ref(ws_props["containerRegistry"]) == f"{names['Microsoft.ContainerRegistry/registries']}.id"


def test_submitter_gets_azureml_data_scientist_on_the_workspace(bicep: dict[str, Any]) -> None:
    ws_name, _ = _one(bicep, "Microsoft.MachineLearningServices/workspaces")
    grants = [_body(r) for r in _of_type(bicep, "Microsoft.Authorization/roleAssignments").values()
              if _role_id(bicep, _body(r)) == DATA_SCIENTIST]
    assert len(grants) == 1, "one AzureML Data Scientist role assignment expected"
    grant = grants[0]
    assert grant["scope"] == ws_name
    assert grant["properties"]["principalId"] == "submitterPrincipalId"
    assert grant["properties"]["principalType"] == "submitterPrincipalType"
    params = bicep["parameters"]
    assert params["submitterPrincipalId"]["type"] == "string"
    allowed = next(d["argument"] for d in params["submitterPrincipalType"]["decorators"] if d["type"] == "allowed")
    assert {"User", "Group"} <= set(allowed)


def test_compute_identity_keeps_its_roles(bicep: dict[str, Any]) -> None:
    gpu_name, _ = _one(bicep, "Microsoft.MachineLearningServices/workspaces/computes")
    kv_name, _ = _one(bicep, "Microsoft.KeyVault/vaults")
    by_scope = {}
    for res in _of_type(bicep, "Microsoft.Authorization/roleAssignments").values():
        body = _body(res)
        principal = body["properties"]["principalId"]
        if isinstance(principal, dict) and principal["operator"]["operands"]["operand_1"] == gpu_name:
            by_scope[body["scope"]] = _role_id(bicep, body)
    assert by_scope.get(kv_name) == KV_SECRETS_USER
    assert {"Microsoft.Storage/storageAccounts", "Microsoft.ContainerRegistry/registries"} <= {
        bicep["resources"][scope]["type"] for scope in by_scope}


@pytest.mark.parametrize("breakage", ["drop_brace", "bad_token"])
def test_a_broken_copy_is_rejected(tmp_path: Path, breakage: str) -> None:
    text = BICEP.read_text()
    if breakage == "drop_brace":  # the workspace resource loses its closing brace
        head, sep, tail = text.partition("resource ws ")
        broken = head + sep + tail.replace("\n}\n", "\n", 1)
    else:  # an assignment with no value
        broken = text.replace("  kind: 'StorageV2'\n", "  kind: 'StorageV2'\n  isHnsEnabled: = \n", 1)
    assert broken != text
    copy = tmp_path / "main.bicep"
    copy.write_text(broken)
    proc = _pycep(copy)
    assert proc.returncode != 0, f"pycep-parser accepted a broken Bicep file ({breakage}):\n{proc.stdout[:500]}"


def test_checkov_finds_no_failed_check_beyond_the_justified_skips() -> None:
    checkov = _tool("checkov")
    # Offline: --skip-download / BC_SKIP_MAPPING stop the Prisma Cloud guideline and policy downloads,
    # CKV_SKIP_PACKAGE_UPDATE_CHECK stops its PyPI version check. LOG_LEVEL=DEBUG makes it say what it skipped.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
           "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "DEBUG", "PYTHONNOUSERSITE": "1",
           "CHECKOV_REQUEST_CONNECT_TIMEOUT": "1", "CHECKOV_REQUEST_RETRIES": "1"}
    env.pop("BC_API_KEY", None)
    proc = subprocess.run([str(checkov), "-d", str(INFRA), "--framework", "bicep", "--skip-download",
                           "-o", "json", "--compact"], capture_output=True, text=True, timeout=180, env=env,
                          cwd=ROOT)
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    # It stayed offline and said so.
    assert "Skipping downloading configs from platform" in proc.stderr
    assert "Skipping prisma policy API call" in proc.stderr
    for sign in ("Failed to get", "NameResolutionError", "Max retries exceeded", "guidelines", "Update available"):
        assert sign not in proc.stderr + proc.stdout, f"checkov tried the network: {sign!r} in its output"
    report = json.loads(proc.stdout)
    assert isinstance(report, dict) and report["check_type"] == "bicep", proc.stdout[:500]
    summary, results = report["summary"], report["results"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in results["failed_checks"]]
    assert not failed, "checkov failed checks; fix main.bicep or skip one inline with its reason:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0 and summary["passed"] > 0, summary

    # The skip-list is main.bicep's own `//checkov:skip=ID:reason` lines: each has a reason, and checkov honoured
    # exactly those (no skip coming from anywhere else, none left unused).
    listed = {cid: why.strip() for cid, why in SKIP_RE.findall(BICEP.read_text())}
    assert all(len(why) >= 20 for why in listed.values()), listed
    assert len(listed) <= 12, "the skip-list should stay short"
    skipped = {c["check_id"]: c["check_result"].get("suppress_comment", "") for c in results["skipped_checks"]}
    assert set(skipped) == set(listed)
    assert all(skipped[cid] == listed[cid] for cid in listed)

