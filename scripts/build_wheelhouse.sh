#!/usr/bin/env bash
# On a machine with network: every wheel scripts/gpu_smoke.sh installs on an offline GPU machine whose
# Python (3.12, manylinux x86_64) already has a CUDA torch. torch, triton and nvidia-* are left out.
#
#   bash scripts/build_wheelhouse.sh DIR        (then copy DIR and the repository to the GPU machine)
#   WHEEL_PYTHON=3.11 bash scripts/build_wheelhouse.sh DIR   (another target Python)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/build_wheelhouse.sh DIR}
mkdir -p "$dir"
version=${WHEEL_PYTHON:-3.12}
target=(--only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
        --python-version "$version" --implementation cp --abi "cp${version/./}" --abi abi3 --abi none)
pip=(python3 -m pip)
# The project itself and the build backend (installed with --no-build-isolation there).
"${pip[@]}" wheel -q --no-deps -w "$dir" .
"${pip[@]}" download -q -d "$dir" "${target[@]}" setuptools wheel
# Resolve .[cluster] for the target, then fetch all but the CUDA stack the machine already has.
report=$(mktemp)
"${pip[@]}" install -q --dry-run --ignore-installed --report "$report" --target "$(mktemp -d)" "${target[@]}" \
    "$(ls "$dir"/grpo_megatron-*.whl)[cluster]" -c requirements-tested.txt
python3 - "$report" > "$dir/requirements.txt" <<'PY'
import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if not re.match(r"(torch|triton|nvidia-|grpo-megatron)", meta["name"].lower().replace("_", "-")):
        print(f"{meta['name']}=={meta['version']}")
PY
"${pip[@]}" download -q --no-deps -d "$dir" "${target[@]}" -r "$dir/requirements.txt"
echo "$(ls "$dir" | wc -l) files in $dir"
