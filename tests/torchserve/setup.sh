#!/usr/bin/env bash
# Install a self-contained TorchServe 0.12.0 (CPU, no PyTorch) for servescope's
# integration tests and demo. Idempotent: re-running skips what is already in
# place (about 0.5 s), so callers run it every time.
#
# Usage: setup.sh [TS_HOME]
#   TS_HOME: install dir (arg 1, else $TS_HOME, else target/torchserve of this
#   repository: a cache that `cargo clean` removes). Layout created there:
#     venv/          python venv with torchserve + stand-in `torch`
#     model-store/   echo.mar slow.mar fail.mar (version 1.0), echo_v2.mar (echo 2.0)
#     config.properties
#     logs/ tmp/
# Needs: root (for apt-get when java / python3-venv are missing), PyPI access.
# Env: PYTHON (python3 to build the venv with; default: python3 on PATH).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TS_HOME="${1:-${TS_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/torchserve}}"
mkdir -p "$TS_HOME"
TS_HOME="$(cd "$TS_HOME" && pwd)"
PYTHON="${PYTHON:-python3}"

now() { date +%s.%N; }
T_ALL=$(now)
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }
say() { echo "[setup] $*"; }

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "apt-get not available; please install: $*" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- 1. Java runtime (frontend is a Java/Netty server) -----------------------
T=$(now)
java_ok() {
    command -v java >/dev/null 2>&1 || return 1
    # Need Java >= 11 (TorchServe 0.12 is built for 11+; 17 used here).
    local v
    v=$(java -version 2>&1 | awk -F'"' '/version/{print $2; exit}')
    [ "${v%%.*}" -ge 11 ] 2>/dev/null
}
if java_ok; then
    say "java present: $(java -version 2>&1 | head -1) ($(elapsed "$T"))"
else
    say "installing openjdk (headless) via apt ..."
    apt_install openjdk-17-jre-headless || apt_install default-jre-headless
    java_ok || { say "java install failed" >&2; exit 1; }
    say "java installed: $(java -version 2>&1 | head -1) ($(elapsed "$T"))"
fi

# ---- 2. Python venv -----------------------------------------------------------
T=$(now)
VENV="$TS_HOME/venv"
if [ ! -x "$VENV/bin/python" ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        apt_install python3 python3-venv
        PYTHON=python3
    fi
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        say "python venv module missing; installing python3-venv via apt ..."
        apt_install python3-venv
        PYTHON=/usr/bin/python3
        "$PYTHON" -m venv "$VENV"
    fi
    say "venv created with $("$VENV/bin/python" --version) ($(elapsed "$T"))"
else
    say "venv present: $("$VENV/bin/python" --version) ($(elapsed "$T"))"
fi

# ---- 3. pip packages (pinned) -------------------------------------------------
T=$(now)
if "$VENV/bin/python" - "$HERE/requirements.txt" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    if version(name) != want:
        sys.exit(1)
EOF
then
    say "pip packages already at pinned versions ($(elapsed "$T"))"
else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
    say "pip install done ($(elapsed "$T"))"
fi

# ---- 4. stand-in torch package ------------------------------------------------
T=$(now)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$SITE/torch" ] && ! grep -q '0.0.0+standin' "$SITE/torch/__init__.py" 2>/dev/null; then
    say "a real torch is installed in the venv; leaving it alone"
else
    rm -rf "$SITE/torch"
    cp -r "$HERE/standin_torch/torch" "$SITE/torch"
    rm -rf "$SITE/torch/__pycache__"
    say "stand-in torch installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') ($(elapsed "$T"))"
fi

# ---- 5. model archives --------------------------------------------------------
T=$(now)
STORE="$TS_HOME/model-store"
mkdir -p "$STORE"
for m in echo slow fail; do
    src="$HERE/handlers/${m}_handler.py"
    mar="$STORE/$m.mar"
    if [ -f "$mar" ] && [ "$mar" -nt "$src" ]; then
        continue
    fi
    "$VENV/bin/torch-model-archiver" --model-name "$m" --version 1.0 \
        --handler "$src" --export-path "$STORE" --force
done
# echo_v2.mar: the same echo handler archived as version 2.0 of model "echo". run.sh does not load
# it (it registers exactly echo, slow and fail); the e2e tests register it through the management API
# so that one model has two versions. torch-model-archiver names its output after --model-name, so it
# is built in a scratch directory and renamed (building into the store would overwrite echo.mar).
src="$HERE/handlers/echo_handler.py"
mar="$STORE/echo_v2.mar"
if ! { [ -f "$mar" ] && [ "$mar" -nt "$src" ]; }; then
    scratch=$(mktemp -d "$TS_HOME/.archive.XXXXXX")
    "$VENV/bin/torch-model-archiver" --model-name echo --version 2.0 \
        --handler "$src" --export-path "$scratch" --force
    mv "$scratch/echo.mar" "$mar"
    rmdir "$scratch"
fi
say "model archives: $(cd "$STORE" && ls ./*.mar | tr '\n' ' ')($(elapsed "$T"))"

# ---- 6. config + dirs ---------------------------------------------------------
cp "$HERE/config.properties" "$TS_HOME/config.properties"
mkdir -p "$TS_HOME/logs" "$TS_HOME/tmp"

"$VENV/bin/python" -c 'import ts, yaml, psutil; from ts.version import __version__ as v; print("[setup] torchserve", v)'
say "TS_HOME=$TS_HOME"
say "total $(elapsed "$T_ALL")"
