#!/usr/bin/env bash
# Run the device's code as a Raspberry Pi runs it -- aarch64 Python 3.11 (Debian 12, as Raspberry Pi OS
# Bookworm) with the aarch64 wheels that constraints.txt pins -- under qemu user emulation of a Pi's CPU,
# on this x86-64 machine. Needs Debian 12, root (apt) and the package registries; about 500 MB in WORKDIR.
#
#   tests/benchmarks/arm64_check.sh setup                 # once: qemu, an arm64 Python, the device's wheels
#   tests/benchmarks/arm64_check.sh evaluate FIELD_DIR    # evaluate-fields on both; the reports must match
#                                                         # (numbers with a fraction to 1e-9: see below)
#   tests/benchmarks/arm64_check.sh pytest [ARGS...]      # the test suite (no browser, training or conversion tests)
#
# CPU=cortex-a72 (a Pi 4, the default) or cortex-a76 (a Pi 5). Not qemu's default CPU ("max"): with it
# ai_edge_litert's int8 kernels gave wrong scores here (0 or 0.986 for every cell).
# WORKDIR (default /tmp/malaria-arm64) holds the arm64 root, the wheels and the reports.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORKDIR:-/tmp/malaria-arm64}
[[ $WORK = /* ]] || WORK=$PWD/$WORK  # it is written into the launcher, which runs from the project folder
CPU=${CPU:-cortex-a72}
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}  # this machine's Python with the project installed (make test makes it)
SYSROOT=$WORK/sysroot
SITE=$WORK/site-packages

write_cpuinfo() {  # NAME VARIANT PART REVISION FEATURES: four cores, as on a Pi 4 or 5
  for n in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$n" "$5" "$2" "$3" "$4"
  done
}

setup() {
  command -v qemu-aarch64-static >/dev/null || { apt-get update -q && apt-get install -y -q qemu-user-static; }
  # an apt of its own for arm64 packages, beside the machine's: download, then unpack (nothing is configured)
  local apt=$WORK/apt
  mkdir -p "$apt/etc/apt/apt.conf.d" "$apt/etc/apt/preferences.d" "$apt/var/lib/dpkg" \
    "$apt/var/cache/apt/archives/partial" "$apt/var/lib/apt/lists/partial" "$SYSROOT" "$SITE"
  touch "$apt/var/lib/dpkg/status"
  cat > "$apt/etc/apt/debian.sources" <<SOURCES
Types: deb
Architectures: arm64
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  cat > "$apt/apt.conf" <<CONF
Dir "$apt/";
Dir::Etc "$apt/etc/apt/";
Dir::Etc::sourcelist "";
Dir::Etc::sourceparts "$apt/etc/apt/";
Dir::Etc::Trusted "/etc/apt/trusted.gpg";
Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d/";
Dir::State::status "$apt/var/lib/dpkg/status";
APT::Architecture "arm64";
APT::Architectures "arm64";
CONF
  apt-get -q -c "$apt/apt.conf" update
  apt-get -q -y -c "$apt/apt.conf" install --download-only python3.11 libstdc++6 libgcc-s1
  for deb in "$apt"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
  # the device extra as pyproject.toml lists it, with pytest and pillow for the tests, as aarch64 wheels
  mapfile -t reqs < <("$HOST_PY" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
for r in extras["device"] + [r for r in extras["dev"] if r.split(">")[0].split("=")[0] in ("pytest", "pillow")]:
    if not r.startswith("sdnotify"):  # an sdist only: pure Python, installed below
        print(r)
PY
  )
  "$HOST_PY" -m pip install -q --target "$SITE" --upgrade -c "$ROOT/constraints.txt" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 --platform any "${reqs[@]}"
  "$HOST_PY" -m pip install -q --target "$SITE" --upgrade --no-deps -c "$ROOT/constraints.txt" sdnotify
  # The CPU as a Pi's /proc/cpuinfo names it: XNNPACK (in ai_edge_litert) reads it, and without it reads the
  # host's x86 one through qemu and crashes while building an interpreter.
  mkdir -p "$SYSROOT/proc"
  write_cpuinfo cortex-a72 0x0 0xd08 3 "fp asimd evtstrm crc32 cpuid" > "$WORK/cpuinfo-cortex-a72"
  write_cpuinfo cortex-a76 0x4 0xd0b 1 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" > "$WORK/cpuinfo-cortex-a76"
  # a launcher, so that the tests' subprocesses (sys.executable) run under qemu too
  cat > "$WORK/python" <<LAUNCH
#!/bin/sh
cpu="\${CPU:-$CPU}"
cmp -s "$WORK/cpuinfo-\$cpu" "$SYSROOT/proc/cpuinfo" || cp "$WORK/cpuinfo-\$cpu" "$SYSROOT/proc/cpuinfo" || exit 2
exec env QEMU_CPU="\$cpu" PYTHONPATH="$SITE:\${REPO:-$ROOT}" qemu-aarch64-static -L "$SYSROOT" -0 "$WORK/python" "$SYSROOT/usr/bin/python3.11" "\$@"
LAUNCH
  chmod +x "$WORK/python"
  "$WORK/python" -c "import platform, cv2, numpy; print('arm64 Python ready:', platform.machine(), 'numpy', numpy.__version__, 'opencv', cv2.__version__)"
}

[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
cmd=$1; shift
[ -x "$HOST_PY" ] || { echo "no Python at $HOST_PY: run 'make test' first, or set HOST_PY" >&2; exit 2; }
export CPU REPO=$ROOT  # read by the launcher
case $cmd in
  setup) setup ;;
  evaluate)
    [ $# -eq 1 ] || { echo "usage: $0 evaluate FIELD_DIR" >&2; exit 2; }
    [ -x "$WORK/python" ] || { echo "run '$0 setup' first" >&2; exit 2; }
    fields=$(cd "$1" && pwd)  # both runs start in the project folder
    name=$(basename "$fields")
    (cd "$ROOT" && "$HOST_PY" -m device evaluate-fields "$fields" --json "$WORK/$name-x86_64.json" > /dev/null)
    (cd "$ROOT" && "$WORK/python" -m device evaluate-fields "$fields" --json "$WORK/$name-$CPU.json" > /dev/null)
    # Cells, boxes, counts and verdicts must be the same; numbers with a fraction to 1e-9 (numpy's exp and log
    # round their last bit differently on an x86-64 CPU with AVX-512 than on an ARM core). Timings differ by nature.
    "$HOST_PY" - "$WORK/$name-x86_64.json" "$WORK/$name-$CPU.json" <<'PY'
import json, math, sys
floats = []  # (x86-64, arm64) pairs of numbers with a fraction
differ = []  # where the reports differ: counts, boxes, verdicts, or numbers past 1e-9
def compare(a, b, where="", key=""):
    if key.endswith("_ms") or key == "field_dir":
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if k in a and k in b:
                compare(a[k], b[k], f"{where}.{k}", k)
            elif not k.endswith("_ms"):
                differ.append(f"{where}.{k}: only on one side")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            differ.append(f"{where}: {len(a)} against {len(b)} entries")
        for n, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{n}]", key)
    elif isinstance(a, float) and isinstance(b, float):
        floats.append((a, b))
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            differ.append(f"{where}: {a!r} against {b!r}")
    elif type(a) is not type(b) or a != b:
        differ.append(f"{where}: {a!r} against {b!r}")
a, b = (json.load(open(p)) for p in sys.argv[1:])
compare(a, b)
off = [abs(x - y) / max(abs(x), abs(y)) for x, y in floats if x != y and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)]
print(f"{sys.argv[1]} and {sys.argv[2]}: " + ("the same" if not differ else f"DIFFERENT in {len(differ)} place" + "s" * (len(differ) > 1))
      + f" (timings aside; {len(off)} of {len(floats)} numbers with a fraction differ in their last bits"
      + (f", by {max(off):.1e} at most)" if off else ")"))
for line in differ[:20]:
    print("  " + line)
sys.exit(1 if differ else 0)
PY
    ;;
  pytest)
    [ -x "$WORK/python" ] || { echo "run '$0 setup' first" >&2; exit 2; }
    cd "$ROOT" && exec "$WORK/python" -m pytest -p no:cacheprovider \
      --ignore=tests/test_browser.py --ignore=tests/test_train_convert.py --ignore=tests/test_train_data.py "$@"
    ;;
  *) echo "unknown command $cmd (setup, evaluate, pytest)" >&2; exit 2 ;;
esac
