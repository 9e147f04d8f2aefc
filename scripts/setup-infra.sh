#!/usr/bin/env bash
# The infra linters (tests/test_infra_bicep.py) in their own venv, ./.venv-infra: checkov pins dozens of packages
# (boto3, packaging<24, networkx<2.7, ...) that would clash with the main .venv's mlflow / azure-ai-ml / torch pins.
# Needs only python3 and PyPI. Idempotent: a stamp of the pins below skips the install when nothing changed.
# pycep-parser is pinned to the version checkov itself requires (checkov==3.3.30 -> pycep-parser==0.5.1), so the
# parser the test calls is the one checkov scans with. The full lock is what was tested on Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-infra
REQS="checkov==3.3.30 pycep-parser==0.5.1"
LOCK='aiodns==3.6.1
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiomultiprocess==0.9.1
aiosignal==1.4.0
annotated-types==0.8.0
argcomplete==3.7.2
asteval==1.0.6
attrs==26.1.0
bc-detect-secrets==1.5.52
bc-jsonpath-ng==1.6.1
bc-python-hcl2==0.4.3
beartype==0.23.1
beautifulsoup4==4.15.0
boolean.py==5.0
boto3==1.35.49
botocore==1.35.99
cached-property==2.0.1
cachetools==5.5.2
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
click-option-group==0.5.10
cloudsplaining==0.7.0
colorama==0.4.6
ConfigArgParse==1.9.0
contextlib2==21.6.0
cyclonedx-python-lib==7.6.2
decorator==5.3.1
defusedxml==0.7.1
docker==7.2.0
dockerfile-parse==2.0.1
dpath==2.1.3
ecdsa==0.19.2
frozenlist==1.8.0
gitdb==4.0.12
GitPython==3.2.1
idna==3.20
importlib_metadata==7.2.1
Jinja2==3.1.6
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
junit-xml==1.9
lark==1.3.1
license-expression==30.4.4
Markdown==3.11.3
MarkupSafe==3.0.4
multidict==7.2.1
networkx==2.6.3
numpy==2.4.6
orjson==3.13.0
packageurl-python==0.13.4
packaging==23.2
platformdirs==4.14.9
ply==3.11
policy_sentry==0.13.2
prettytable==3.19.0
propcache==0.5.4
py-serializable==1.1.2
pycares==4.11.0
pycparser==3.12
pydantic==2.14.4
pydantic_core==2.50.5
pyparsing==3.3.3
python-dateutil==2.9.0.post0
PyYAML==6.0.4
rdflib==7.6.0
referencing==0.37.0
regex==2026.11.19
requests==2.34.2
rpds-py==2026.9.1
rustworkx==0.18.1
s3transfer==0.10.4
schema==0.7.5
semantic-version==2.10.0
six==1.17.0
smmap==5.0.3
sortedcontainers==2.4.0
soupsieve==4.1.3
spdx-tools==0.8.5
tabulate==0.9.0
termcolor==2.3.0
tqdm==4.70.1
typing-inspection==0.4.5
typing_extensions==4.16.0
unidiff==1.0.1
uritools==7.0.1
urllib3==2.8.0
wcwidth==0.9.4
xmltodict==1.0.4
yarl==1.25.1
zipp==4.1.2'
stamp_src=$(printf '%s\n%s\n%s\n' "$REQS" "$LOCK" "$("$PY" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)
if [ -f "$VENV/.infra-stamp" ] && [ "$(cat "$VENV/.infra-stamp")" = "$stamp_src" ] && [ -x "$VENV/bin/checkov" ]; then
  echo "setup-infra: .venv-infra is up to date"
  exit 0
fi
rm -f "$VENV/.infra-stamp"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
printf '%s\n' "$LOCK" > "$VENV/constraints.txt"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/constraints.txt" $REQS 2>&1 \
  | { grep -v "is ignored" || true; }
"$VENV/bin/python" -c "import pycep, checkov.version as v; print('setup-infra: ok, checkov', v.version)"
echo "$stamp_src" > "$VENV/.infra-stamp"
