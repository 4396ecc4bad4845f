#!/usr/bin/env bash
# The GPU check on a machine without internet, in one command: install an offline kit beside the
# machine's own PyTorch (nothing is downloaded), print what the machine has against the kit's
# profile, then run every part of benchmarks/gpu_check.py within one budget, install included.
#
#   python packaging/offline_kit.py --have packaging/profiles/cuda-node.txt --out build/kit   # with internet
#   bash benchmarks/gpu_box.sh build/kit OUT_DIR            # on the GPU machine: 480 s in all
#   bash benchmarks/gpu_box.sh build/kit OUT_DIR --cpu      # the rehearsal on a CPU machine
#
# Further options go to gpu_check.py (--budget-s, --cap PART=S, --parts). OUT_DIR receives the
# report (gpu-<card>.md and .json), every part's output (gpu-<card>.log) and the install's log,
# the report after every part. PYTHON names the interpreter (default python3). Exit 0 when every
# part passed or was skipped with its reason, 1 otherwise, 2 for a wrong command.
set -uo pipefail
started=$(date +%s.%N)
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

if [ $# -lt 2 ] || [ "${1#-}" != "$1" ] || [ "${2#-}" != "$2" ]; then
    echo "usage: bash benchmarks/gpu_box.sh KIT_DIR OUT_DIR [--cpu] [gpu_check.py options]" >&2
    exit 2
fi
given=$1
kit=$(cd "$given" 2>/dev/null && pwd) || { echo "gpu_box: $given: no such folder" >&2; exit 2; }
out=$2
shift 2
if [ ! -f "$kit/kit.json" ]; then
    echo "gpu_box: $kit holds no offline kit (no kit.json); build one where there is internet with:" \
         "python packaging/offline_kit.py --have packaging/profiles/cuda-node.txt --out $given" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/tunesmith-kit.XXXXXX") || exit 1
trap 'rm -rf "$scratch"' EXIT
site=$scratch/site

echo "Installing the offline kit $kit into $site (no index, no dependencies)..."
if ! "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --no-warn-script-location --target "$site" "$kit"/*.whl > "$out/gpu-box-install.log" 2>&1; then
    echo "gpu_box: installing the kit failed: $(grep -v '^ *$' "$out/gpu-box-install.log" | tail -1)" \
         "(whole log: $out/gpu-box-install.log)" >&2
    exit 1
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" TUNESMITH_KIT="$kit" TUNESMITH_KIT_SITE="$site"
export PYTHONUNBUFFERED=1

# What the machine has, against the profile the kit was built for (no torch import: instant)
"$python" - "$kit/kit.json" <<'EOF'
import json, platform, sys
from importlib import metadata

manifest = json.load(open(sys.argv[1], encoding="utf-8"))
print(f"Python {platform.python_version()} (the kit was built for {manifest['python']}, profile {manifest['profile']})")
print("From the kit: " + ", ".join(f"{w['name']} {w['version']}" for w in manifest["wheels"]))
lines = []
for need in manifest["relies_on"]:
    try:
        found = metadata.version(need["name"])
    except metadata.PackageNotFoundError:
        found = "MISSING"
    profile = need["profile_version"]
    known = not profile.startswith("(")
    mark = "" if not known or found.split("+")[0] == profile else f" (the profile says {profile})"
    lines.append(f"{need['name']} {found}{mark}")
print("From the machine: " + ", ".join(lines))
missing = [line.split()[0] for line in lines if line.split()[1] == "MISSING"]
if missing:
    print("Missing here though the profile lists them: " + ", ".join(missing)
          + " (the parts that need them will say so)")
EOF

cd "$repo" || exit 1
"$python" benchmarks/gpu_check.py --out "$out" --since "$started" "$@"
