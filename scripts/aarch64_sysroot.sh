#!/usr/bin/env bash
# Build an arm64 Debian bookworm sysroot with python3 and aarch64 wheels of TVM + NumPy, so aarch64 artifacts
# (repq-tvm compile --target aarch64-neon-dotprod) run on an x86 machine under user-mode QEMU:
#
#     scripts/aarch64_sysroot.sh runs/aarch64-sysroot        (or: make aarch64-sysroot)
#     qemu-aarch64-static -L DIR DIR/usr/bin/python3 ...      with PYTHONPATH=DIR/opt/pywheels
#
# Steps (each skipped when its stamp in DIR/.repq-sysroot/ says it is done, so re-running is cheap):
#   1. debootstrap --foreign (first stage only: the second stage would need to execute arm64 binaries);
#   2. unpack every downloaded .deb into DIR (what the second stage would have installed);
#   3. pip install --target DIR/opt/pywheels the aarch64 wheels, pinned to the versions in pyproject.toml
#      (TVM, NumPy, and cloudpickle + psutil, which TVM's RPC server, python -m tvm.exec.rpc_server, needs);
#   4. smoke test: import tvm and numpy under qemu-aarch64-static.
# Needs root (debootstrap), network to a Debian mirror (DEBIAN_MIRROR) and PyPI. About 200 MB of downloads.
set -euo pipefail

DIR=${1:?usage: $0 DIR   (e.g. runs/aarch64-sysroot)}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS_SUBDIR=opt/pywheels   # repq_tvm/deploy/qemu.py looks here
STAMPS="$DIR/.repq-sysroot"

say() { printf '[aarch64-sysroot] %s\n' "$*"; }
die() { printf '[aarch64-sysroot] error: %s\n' "$*" >&2; exit 1; }

# The wheel pins come from pyproject.toml so the sysroot runs the same TVM as the compiler that built the artifact.
pin() { grep -o "\"$1[=<>][^\"]*\"" "$REPO/pyproject.toml" | head -n1 | tr -d '"'; }
TVM_PIN=$(pin apache-tvm)
FFI_PIN=$(pin apache-tvm-ffi)
NUMPY_PIN=$(pin numpy)
CLOUDPICKLE_PIN=$(pin cloudpickle)
PSUTIL_PIN=$(pin psutil)
[ -n "$TVM_PIN" ] && [ -n "$FFI_PIN" ] && [ -n "$NUMPY_PIN" ] && [ -n "$CLOUDPICKLE_PIN" ] && [ -n "$PSUTIL_PIN" ] \
    || die "cannot read the TVM/NumPy/cloudpickle/psutil pins from $REPO/pyproject.toml"
WHEEL_SPEC="$TVM_PIN $FFI_PIN $NUMPY_PIN $CLOUDPICKLE_PIN $PSUTIL_PIN"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
STAMPS="$DIR/.repq-sysroot"
mkdir -p "$STAMPS"

# 1. debootstrap, first stage
if [ -f "$STAMPS/debootstrap.done" ]; then
    say "1/4 debootstrap: done before, skipping"
else
    if ! command -v debootstrap >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "1/4 installing debootstrap with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null \
                || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
        else
            die "debootstrap is missing: install the Debian package debootstrap (as root: apt-get install debootstrap)"
        fi
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    say "1/4 debootstrap --arch=arm64 --foreign $SUITE from $MIRROR (downloads ~60 MB, a few minutes)"
    # libstdc++6/libgcc-s1: the TVM runtime wheel links against them (allowed by manylinux, not in minbase).
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,libstdc++6,libgcc-s1 \
        "$SUITE" "$DIR" "$MIRROR" > "$STAMPS/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STAMPS/debootstrap.log" >&2; die "debootstrap failed (full log: $STAMPS/debootstrap.log)"; }
    touch "$STAMPS/debootstrap.done"
fi

# 2. unpack the .debs the (impossible) second stage would have installed
if [ -f "$STAMPS/unpack.done" ]; then
    say "2/4 unpack .debs: done before, skipping"
else
    shopt -s nullglob
    debs=("$DIR"/var/cache/apt/archives/*.deb)
    [ ${#debs[@]} -gt 0 ] || die "no .debs in $DIR/var/cache/apt/archives: delete $DIR and run again"
    say "2/4 unpacking ${#debs[@]} .debs with dpkg-deb"
    for deb in "${debs[@]}"; do
        # tar --keep-directory-symlink keeps bookworm's merged-/usr links (/lib -> usr/lib) intact
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$DIR" --keep-directory-symlink --no-same-owner \
            || die "cannot unpack $deb"
    done
    [ -e "$DIR/usr/bin/python3" ] || die "python3 missing after unpacking (no $DIR/usr/bin/python3)"
    touch "$STAMPS/unpack.done"
fi

# 3. aarch64 wheels (pure downloads: pip never runs arm64 code here)
if [ -f "$STAMPS/wheels.done" ] && [ "$(cat "$STAMPS/wheels.done")" = "$WHEEL_SPEC" ]; then
    say "3/4 wheels ($WHEEL_SPEC): done before, skipping"
else
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=${PYTHON:-python3}; fi
    "$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip (run make setup first, or set PYTHON)"
    say "3/4 pip install --target $DIR/$WHEELS_SUBDIR $WHEEL_SPEC (manylinux_2_28_aarch64, cp311)"
    rm -rf "${DIR:?}/$WHEELS_SUBDIR"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --target "$DIR/$WHEELS_SUBDIR" --platform manylinux_2_28_aarch64 \
        --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: $WHEEL_SPEC \
        || die "pip could not fetch the aarch64 wheels"
    printf '%s' "$WHEEL_SPEC" > "$STAMPS/wheels.done"
fi

# 4. smoke test under qemu
if command -v qemu-aarch64-static >/dev/null 2>&1; then
    say "4/4 smoke test: import tvm, numpy under qemu-aarch64-static (~10 s)"
    PYTHONPATH="$DIR/$WHEELS_SUBDIR" PYTHONNOUSERSITE=1 qemu-aarch64-static -L "$DIR" "$DIR/usr/bin/python3" -c \
        'import platform, numpy, tvm, tvm.rpc, cloudpickle; print(f"  {platform.machine()}: python {platform.python_version()}, tvm {tvm.__version__}, numpy {numpy.__version__}")' \
        || die "the sysroot does not import tvm under qemu"
else
    say "4/4 smoke test skipped: qemu-aarch64-static not installed (make aarch64-tools)"
fi
say "ready: $DIR"
