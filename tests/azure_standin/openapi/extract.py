"""Extract, from Azure/azure-rest-api-specs, the Swagger (OpenAPI 2.0) schemas of the request bodies the Azure ML
stand-in accepts, per api-version, into `mfe-request-schemas.json` beside this file (read by `check_request`).

Source files (in a checkout of https://github.com/Azure/azure-rest-api-specs; a sparse checkout of
`specification/machinelearningservices` and `specification/common-types` is enough):

    specification/machinelearningservices/resource-manager/Microsoft.MachineLearningServices/
        stable/2023-04-01/mfe.json                    environments/codes/models/data container + version PUT,
        preview/2023-04-01-preview/mfe.json             startPendingUpload; jobs PUT (2023-04/2024-01 previews)
        preview/2023-08-01-preview/mfe.json
        preview/2024-01-01-preview/mfe.json
        preview/2024-10-01-preview/mfe.json           datastores listSecrets
        preview/2025-01-01-preview/mfe.json           jobs PUT (what azure-ai-ml 1.35.2 sends)
    specification/common-types/resource-management/v3/types.json   (ProxyResource, systemData, ...)

Which api-version the SDK sends for which operation: tests/test_standin.py leaves <tmp>/request-log.json; the
route table in routes_control.py (V_ASSET, V_JOB, V_DS) lists the served sets. `SELECT` below mirrors it.

What is kept: the operations' body parameters (method, swagger path template, operationId, required) and every
definition reachable from them: `$ref`s (including into common-types, renamed `common.<path>.<name>`), `allOf`
parents and, for a `discriminator` base, every child (a definition whose allOf names the base and that carries
`x-ms-discriminator-value`). Children of a base listed in `CHILDREN_CHECKED` that are not listed there are kept as
stubs (name + discriminator value + `x-standin-not-extracted`): their value is known, their body is not checked
(the stand-in runs Command jobs only and refuses the rest in its handler). Descriptions, examples, defaults and
other documentation keys are dropped; only validation keywords stay.

Re-run (writes mfe-request-schemas.json; `--from VERSION=ROOT@COMMIT` takes one api-version from another tree):

    git clone --filter=blob:none --sparse https://github.com/Azure/azure-rest-api-specs /tmp/specs
    git -C /tmp/specs sparse-checkout set specification/machinelearningservices specification/common-types
    .venv/bin/python tests/azure_standin/openapi/extract.py --specs /tmp/specs \\
        --commit "$(git -C /tmp/specs rev-parse HEAD)"

The committed JSON was made from commit a977c730fda43ab19c05373b32c7159d6f265e9a (2024-07-08, main, #29673) for
2023-04-01, 2023-04-01-preview, 2023-08-01-preview, 2024-01-01-preview and common-types; the full repository
could not be brought here (too large), and no mirror of a 2025 tree was small enough, so 2024-10-01-preview
(commit 01c686d24f882fb1ff953885cfd2b0beab068dd5) and 2025-01-01-preview (commit
02c6a5e7a3205c05918f96c40453ddbe81ffe6fe) came from excerpts of those files read through a code index: the listed
operations and every definition their closure reaches, copied key by key without descriptions. Re-running on a
full checkout reproduces the same shape; any difference is a spec change to look at. The committed file came from:

    extract.py --specs <tree at a977c730> --commit a977c730fda43ab19c05373b32c7159d6f265e9a \\
        --from 2025-01-01-preview=<excerpt tree>@02c6a5e7a3205c05918f96c40453ddbe81ffe6fe \\
        --from 2024-10-01-preview=<excerpt tree>@01c686d24f882fb1ff953885cfd2b0beab068dd5
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = "Azure/azure-rest-api-specs"
MLS = "specification/machinelearningservices/resource-manager/Microsoft.MachineLearningServices"
WS = (
    "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.MachineLearningServices"
    "/workspaces/{workspaceName}"
)
ASSETS = [
    ("put", f"{WS}/{kind}/{{name}}{tail}")
    for kind in ("codes", "environments", "models", "data")
    for tail in ("", "/versions/{version}")
] + [("post", f"{WS}/{kind}/{{name}}/versions/{{version}}/startPendingUpload") for kind in ("codes", "models", "data")]
JOBS = [("put", f"{WS}/jobs/{{id}}")]
DATASTORE_SECRETS = [("post", f"{WS}/datastores/{{name}}/listSecrets")]
# api-version -> (folder, operations): what the stand-in serves (routes_control.V_ASSET / V_JOB / V_DS).
SELECT: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "2023-04-01": ("stable", ASSETS),
    "2023-04-01-preview": ("preview", ASSETS + JOBS),
    "2023-08-01-preview": ("preview", ASSETS),
    "2024-01-01-preview": ("preview", JOBS),
    "2024-10-01-preview": ("preview", DATASTORE_SECRETS),
    "2025-01-01-preview": ("preview", JOBS),
}
# Polymorphic bases whose children are checked only for these subtypes (the others become stubs).
CHILDREN_CHECKED = {"JobBase": {"CommandJob"}}
KEEP = {
    "type", "format", "enum", "properties", "required", "additionalProperties", "items", "allOf", "$ref",
    "discriminator", "x-ms-discriminator-value", "readOnly", "x-nullable", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "uniqueItems",
}  # fmt: skip


def _strip(schema: Any) -> Any:
    """Only validation keywords; `properties` keeps its (property-name) keys."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "x-ms-enum" and isinstance(v, dict):
            out[k] = {"name": v.get("name"), "modelAsString": bool(v.get("modelAsString"))}
        elif k not in KEEP:
            continue
        elif k == "properties":
            out[k] = {name: _strip(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties"):
            out[k] = _strip(v)
        elif k == "allOf":
            out[k] = [_strip(x) for x in v]
        else:
            out[k] = v
    return out


class _Source:
    """The swagger files of one api-version, with $refs resolved relative to the referencing file."""

    def __init__(self, root: Path, main: Path):
        self.root, self.main = root, main
        self.docs: dict[Path, dict[str, Any]] = {}

    def doc(self, path: Path) -> dict[str, Any]:
        path = path.resolve()
        if path not in self.docs:
            self.docs[path] = json.loads(path.read_text(encoding="utf-8"))
        return self.docs[path]

    def key(self, file: Path, name: str) -> str:
        if file.resolve() == self.main.resolve():
            return name
        rel = file.resolve().relative_to((self.root / "specification" / "common-types").resolve())
        return "common." + ".".join(rel.with_suffix("").parts) + "." + name

    def target(self, file: Path, ref: str) -> tuple[Path, str]:
        where, _, frag = ref.partition("#")
        if not frag.startswith("/definitions/"):
            raise ValueError(f"unsupported $ref {ref!r} in {file}")
        return ((file.parent / where) if where else file), frag[len("/definitions/") :]


def extract_version(root: Path, api_version: str) -> dict[str, Any]:
    folder, ops = SELECT[api_version]
    main = root / MLS / folder / api_version / "mfe.json"
    src = _Source(root, main)
    spec = src.doc(main)
    out_defs: dict[str, Any] = {}
    queue: list[tuple[Path, str]] = []

    def rewrite(node: Any, file: Path) -> Any:
        if isinstance(node, dict):
            new = {}
            for k, v in node.items():
                if k == "$ref":
                    tfile, tname = src.target(file, v)
                    queue.append((tfile, tname))
                    new[k] = "#/definitions/" + src.key(tfile, tname)
                elif k == "properties":
                    new[k] = {n: rewrite(p, file) for n, p in v.items()}
                else:
                    new[k] = rewrite(v, file)
            return new
        if isinstance(node, list):
            return [rewrite(x, file) for x in node]
        return node

    operations = []
    for method, template in ops:
        op = (spec.get("paths", {}).get(template) or {}).get(method)
        if op is None:
            continue  # this api-version has no such operation (e.g. startPendingUpload on some kinds)
        body = [p for p in op.get("parameters", []) if isinstance(p, dict) and p.get("in") == "body"]
        if not body:
            continue
        operations.append({
            "method": method.upper(), "path": template, "operationId": op.get("operationId"),
            "body": {"required": bool(body[0].get("required")), "schema": rewrite(_strip(body[0]["schema"]), main)},
        })  # fmt: skip

    def children_of(file: Path, base: str) -> list[str]:
        defs = src.doc(file)["definitions"]
        return [
            n for n, d in defs.items()
            if any(a.get("$ref") == f"#/definitions/{base}" for a in d.get("allOf", []) if isinstance(a, dict))
        ]  # fmt: skip

    seen: set[tuple[Path, str]] = set()
    while queue:
        file, name = queue.pop()
        ident = (file.resolve(), name)
        if ident in seen:
            continue
        seen.add(ident)
        defs = src.doc(file).get("definitions", {})
        if name not in defs:
            raise KeyError(f"{name} not defined in {file}")
        d = defs[name]
        out_defs[src.key(file, name)] = rewrite(_strip(d), file)
        if "discriminator" in d:
            checked = CHILDREN_CHECKED.get(name)
            for child in children_of(file, name):
                cd = defs[child]
                if checked is not None and child not in checked:
                    out_defs[src.key(file, child)] = {
                        "allOf": [{"$ref": "#/definitions/" + src.key(file, name)}],
                        "x-ms-discriminator-value": cd.get("x-ms-discriminator-value", child),
                        "x-standin-not-extracted": True,
                    }
                    continue
                queue.append((file, child))
    return {"operations": operations, "definitions": dict(sorted(out_defs.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", type=Path, required=True, help="root of an azure-rest-api-specs checkout")
    ap.add_argument("--commit", required=True, help="its commit (recorded in the output)")
    ap.add_argument("--from", dest="overrides", action="append", default=[], metavar="VERSION=ROOT@COMMIT",
                    help="take one api-version from another tree (same layout)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("mfe-request-schemas.json"))
    args = ap.parse_args(argv)
    roots = {v: (args.specs, args.commit) for v in SELECT}
    for o in args.overrides:
        m = re.fullmatch(r"([^=]+)=(.+)@([0-9a-f]{40})", o)
        if not m or m[1] not in SELECT:
            ap.error(f"bad --from {o!r}")
        roots[m[1]] = (Path(m[2]), m[3])
    result: dict[str, Any] = {
        "generated_by": "tests/azure_standin/openapi/extract.py",
        "source": {
            "repo": REPO,
            "files": {v: {"path": f"{MLS}/{SELECT[v][0]}/{v}/mfe.json", "commit": roots[v][1]} for v in SELECT},
            "common_types": {
                "path": "specification/common-types/resource-management/v3/types.json",
                "commit": args.commit,
            },
        },  # fmt: skip
        "api_versions": {v: extract_version(roots[v][0], v) for v in SELECT},
    }
    args.out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
