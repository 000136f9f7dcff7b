#!/usr/bin/env bash
# Install, upgrade or remove the Malaria Detect service on Raspberry Pi OS Bookworm (64-bit).
#
#   sudo systemd/install.sh                       install, or upgrade in place
#   sudo systemd/install.sh --uninstall           remove the service and the code
#   sudo systemd/install.sh --uninstall --purge   ... and the config, the data and the user
#
# Install from a checkout or release folder of the project, not from /opt/malaria-detect (which it
# replaces); --uninstall may run from there. Every action is printed as it is done; --dry-run
# prints them and changes nothing.
# See systemd/README.md.
set -euo pipefail
umask 022

readonly APP=malaria-detect
readonly SERVICE_USER=malaria-detect
readonly UNIT=malaria-detect.service
# python3-picamera2 brings libcamera and its Python bindings (not on PyPI). OpenCV, numpy and the
# rest come from PyPI into the venv, pinned by constraints.txt.
readonly APT_PACKAGES=(python3-venv python3-picamera2)

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly SRC_DIR

ROOT=""
DRY_RUN=0
SKIP_VENV=0
UNINSTALL=0
PURGE=0
WHEELHOUSE=""
STARTED_AT="" # when install_unit (re)started the service

usage() {
  cat <<EOF
Usage: sudo $0 [OPTIONS]

Installs the code to /opt/$APP (with its venv), the config to /etc/$APP/config.toml (only if
there is none), and the unit $UNIT; the database and images live in /var/lib/$APP. Re-running
upgrades in place and keeps the config and the data.

Options:
  --dry-run         print every action, change nothing
  --root DIR        install under DIR instead of / (tests, image building): no apt-get, no
                    user, no systemctl, no file owners, no venv (its scripts would name DIR)
  --skip-venv       keep the venv as it is: no pip (an offline update of code, config, unit)
  --wheelhouse DIR  pip installs from the wheels in DIR only, without a network
  --uninstall       stop and remove the service and /opt/$APP; keep /etc/$APP and /var/lib/$APP
  --purge           with --uninstall: also remove /etc/$APP, /var/lib/$APP and the user
  -h, --help        this help
EOF
}

die() {
  echo "install.sh: error: $*" >&2
  exit 1
}

note() {
  echo "install.sh: $*"
}

# Print an action, then do it unless --dry-run.
run() {
  echo "+ $(quote "$@")"
  if [ "$DRY_RUN" = 0 ]; then
    "$@"
  fi
}

# An action on the running system (apt-get, users, systemctl, owners): skipped under --root.
sys() {
  if [ -n "$ROOT" ]; then
    echo "skip (--root): $(quote "$@")"
  else
    run "$@"
  fi
}

# Words as a shell would need them: plain when safe, else in single quotes.
quote() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --root)
        [ $# -ge 2 ] || die "--root needs a folder"
        ROOT=$(realpath -m -- "$2")
        shift
        ;;
      --root=*) ROOT=$(realpath -m -- "${1#--root=}") ;;
      --skip-venv) SKIP_VENV=1 ;;
      --wheelhouse)
        [ $# -ge 2 ] || die "--wheelhouse needs a folder"
        WHEELHOUSE=$(realpath -m -- "$2")
        shift
        ;;
      --wheelhouse=*) WHEELHOUSE=$(realpath -m -- "${1#--wheelhouse=}") ;;
      --uninstall) UNINSTALL=1 ;;
      --purge) PURGE=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
  done
  if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
    die "--purge goes with --uninstall"
  fi
  if [ "$ROOT" = / ]; then
    ROOT=""
  fi
  if [ -n "$ROOT" ]; then
    SKIP_VENV=1
  fi
  if [ -n "$WHEELHOUSE" ] && [ ! -d "$WHEELHOUSE" ]; then
    die "--wheelhouse $WHEELHOUSE: no such folder"
  fi
}

set_paths() {
  OPT_DIR="$ROOT/opt/$APP"
  VENV="$OPT_DIR/.venv"
  ETC_DIR="$ROOT/etc/$APP"
  STATE_DIR="$ROOT/var/lib/$APP"
  UNIT_DIR="$ROOT/etc/systemd/system"
  readonly OPT_DIR VENV ETC_DIR STATE_DIR UNIT_DIR
}

check_privileges() {
  if [ -z "$ROOT" ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root: sudo $0 $*"
  fi
}

check_source() {
  local f
  for f in pyproject.toml constraints.txt device/__main__.py systemd/$UNIT systemd/config.toml; do
    [ -f "$SRC_DIR/$f" ] || die "$SRC_DIR/$f is missing: run install.sh from the project folder"
  done
  if [ "$SRC_DIR" = "$OPT_DIR" ] || [ "$SRC_DIR" = "$OPT_DIR.new" ] || [ "$SRC_DIR" = "$OPT_DIR.old" ]; then
    die "install.sh runs from $SRC_DIR, which it replaces or uses for the swap: run it from a checkout or" \
      "release folder elsewhere"
  fi
  # The model ships with the code: a .tflite and its model card (.json, same name) in models/.
  local models=0 model
  for model in "$SRC_DIR"/models/*.tflite; do
    [ -f "$model" ] || continue
    [ -f "${model%.tflite}.json" ] || die "$model has no model card ${model%.tflite}.json beside it"
    models=$((models + 1))
  done
  [ "$models" -gt 0 ] || die "no model in $SRC_DIR/models/ (a .tflite with its .json card): the service needs one"
}

check_platform() {
  if [ -n "$ROOT" ]; then
    return
  fi
  command -v python3 >/dev/null || die "python3 not found (Raspberry Pi OS Bookworm has Python 3.11)"
  python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    die "python3 is $(python3 -V 2>&1), the project needs 3.11 (Raspberry Pi OS Bookworm)"
  local arch
  arch=$(dpkg --print-architecture 2>/dev/null || echo unknown)
  if [ "$arch" != arm64 ]; then
    note "warning: architecture $arch; the device is built for 64-bit Raspberry Pi OS (arm64)"
  fi
}

install_apt_packages() {
  local missing=() pkg status
  for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) || status=""
    if [ "$status" != "install ok installed" ]; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" = 0 ]; then
    note "apt packages present: ${APT_PACKAGES[*]}"
    return
  fi
  # --no-install-recommends: on Raspberry Pi OS Lite, picamera2's recommends pull in GUI packages.
  sys apt-get update
  sys env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

create_user() {
  if getent passwd "$SERVICE_USER" >/dev/null; then
    note "user $SERVICE_USER exists"
  elif getent group "$SERVICE_USER" >/dev/null; then
    sys useradd --system --gid "$SERVICE_USER" --home-dir "/var/lib/$APP" --no-create-home \
      --shell /usr/sbin/nologin --comment "Malaria Detect service" "$SERVICE_USER"
  else
    sys useradd --system --user-group --home-dir "/var/lib/$APP" --no-create-home \
      --shell /usr/sbin/nologin --comment "Malaria Detect service" "$SERVICE_USER"
  fi
  # The unit adds the group too (SupplementaryGroups=video); this also covers `sudo -u` checks.
  sys usermod --append --groups video "$SERVICE_USER"
}

stop_service() {
  if [ -z "$ROOT" ] && systemctl is-active --quiet "$UNIT" 2>/dev/null; then
    run systemctl stop "$UNIT"
    if [ "$DRY_RUN" = 0 ]; then
      trap restart_after_failure EXIT
      # killed by a signal (Ctrl-C, a dropped SSH session), bash runs the EXIT trap with $? = 0
      trap 'exit 130' INT
      trap 'exit 129' HUP
      trap 'exit 143' TERM
    fi
  fi
}

# A step after the stop failed (no network for pip, a config the new version refuses): the clinic must
# not be left with the service down. Start it again on what is installed and say what state it is in.
restart_after_failure() {
  local rc=$?
  trap - EXIT INT HUP TERM
  if [ "$rc" = 0 ]; then
    return
  fi
  set +e # a terminal that is gone (SSH dropped) fails every echo: start the service all the same
  echo "install.sh: failed after the service was stopped; starting it again on what is installed" >&2
  recover_interrupted_swap
  if systemctl start "$UNIT"; then
    echo "install.sh: $APP is running again, but the update is incomplete: fix the error above and run" \
      "install.sh again" >&2
  else
    echo "install.sh: $APP does not start: journalctl -u $APP -n 50 --no-pager" >&2
  fi
  exit "$rc"
}

# An update cut short after copy_code began its renames and before the new code passed check_config (a
# failed rename or step, Ctrl-C, a dropped SSH session) leaves $OPT_DIR.old: the version that ran before.
# Put it back, with the venv from wherever the swap had moved it, before anything else (restart_after_failure
# then starts the service on it, and the next run copies the new code again and checks it).
recover_interrupted_swap() {
  if [ "$DRY_RUN" = 1 ] || [ ! -d "$OPT_DIR.old" ]; then
    return
  fi
  note "an earlier update stopped mid-swap, before its new code passed check-config: putting $OPT_DIR.old back"
  roll_back_code
}

# Replace the code in /opt/malaria-detect with this folder's, keeping the venv: an upgrade reuses
# the installed packages. Owned by root and read-only to the service. The copy is made beside it first
# (the step that fails on a full card) and swapped in by renames: a failed copy leaves the installed
# code whole, for the service to start again on, never half of each.
copy_code() {
  local excludes=(
    --anchored --exclude=./.git --exclude=./.venv --exclude=./.ci --exclude=./data
    --exclude=./runs --exclude=./tests --exclude=./test-artifacts --exclude=./cache
    --exclude=./build --exclude=./wheels
    --no-anchored --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info'
    --exclude=.pytest_cache --exclude=.ruff_cache
  )
  local stage="$OPT_DIR.new" old="$OPT_DIR.old"
  run rm -rf -- "$stage" "$old"
  run mkdir -p "$stage"
  echo "+ $(quote tar -C "$SRC_DIR" "${excludes[@]}" -cf - .) | $(quote tar -C "$stage" --no-same-owner -xf -)"
  if [ "$DRY_RUN" = 0 ]; then
    if ! tar -C "$SRC_DIR" "${excludes[@]}" -cf - . | tar -C "$stage" --no-same-owner -xf -; then
      rm -rf -- "$stage"
      die "could not copy the code to $stage (a full card? df -h /opt); $OPT_DIR is left as it was"
    fi
  fi
  # Directories and executables 0755, other files 0644, whatever the modes in the checkout.
  run chmod -R u=rwX,go=rX -- "$stage"
  if [ -d "$OPT_DIR" ]; then
    run mv -- "$OPT_DIR" "$old"
    if [ -d "$old/.venv" ] || [ "$DRY_RUN" = 1 ]; then
      run mv -- "$old/.venv" "$stage/.venv"
    fi
  fi
  run mv -- "$stage" "$OPT_DIR"
  if [ -d "$old" ] && [ -z "$(ls -A -- "$old")" ]; then
    run rmdir -- "$old" # a first install: the folder held only the venv, no version to go back to
  fi
  # $old stays until the new code has passed check_config: roll_back_code puts it back otherwise
}

# The new code refused the config (or the model it names), or the update stopped before the check passed:
# put the installed version ($OPT_DIR.old) back with the venv, for the service to start again on what ran
# before. Each step leaves a state this function finishes when run again (recover_interrupted_swap): the
# venv goes into the old tree first, from wherever copy_code had got it to, then the trees swap back.
roll_back_code() {
  local stage="$OPT_DIR.new" old="$OPT_DIR.old" from
  if [ ! -d "$old/.venv" ]; then
    for from in "$OPT_DIR/.venv" "$stage/.venv"; do
      if [ -d "$from" ]; then
        mv -- "$from" "$old/.venv"
        break
      fi
    done
  fi
  if [ -d "$OPT_DIR" ]; then
    rm -rf -- "$stage"
    mv -- "$OPT_DIR" "$stage"
  fi
  mv -- "$old" "$OPT_DIR"
  rm -rf -- "$stage"
}

# The packages of the device extra, as this folder's pyproject.toml lists them (one per line).
device_requirements() {
  python3 - "$SRC_DIR/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["device"]))
PY
}

install_venv() {
  if [ "$SKIP_VENV" = 1 ]; then
    if [ -z "$ROOT" ] && [ ! -x "$VENV/bin/python" ]; then
      die "--skip-venv, but there is no venv at $VENV yet: run once without --skip-venv"
    fi
    note "venv left as it is (${ROOT:+--root, }--skip-venv)"
    return
  fi
  # A venv from another Python (an OS upgrade) is rebuilt. --system-site-packages: picamera2 and
  # libcamera come from apt.
  if [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    note "reusing $VENV"
  else
    stop_service # the service must not run from a venv being replaced (started again on failure)
    run rm -rf "$VENV"
    run python3 -m venv --system-site-packages "$VENV"
  fi
  local offline=() reqs=()
  if [ -n "$WHEELHOUSE" ]; then
    offline=(--no-index --find-links "$WHEELHOUSE")
  fi
  mapfile -t reqs < <(device_requirements)
  [ "${#reqs[@]}" -gt 0 ] || die "no device requirements in $SRC_DIR/pyproject.toml"
  # Only what the code needs, not the project itself: the service runs the code from $OPT_DIR (its
  # working directory). Installing the project rebuilt it on every run, which needs setuptools from the
  # index: a re-run without a network failed even when no package had changed. Installed before the
  # service is stopped and the code replaced, from this folder's lists: a pip that cannot reach the index
  # or the wheelhouse stops the update with nothing changed. constraints.txt pins numpy 1.26.4: apt's
  # picamera2 stack is built on numpy 1.x.
  run "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input "${offline[@]}" \
    -c "$SRC_DIR/constraints.txt" "${reqs[@]}"
  # a copy of the code that earlier versions of this script installed into the venv: not what runs
  local uninstall=("$VENV/bin/python" -m pip uninstall --disable-pip-version-check --no-input -y malaria-detect)
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ $(quote "${uninstall[@]}")   # only if an earlier version installed the project into the venv"
  elif "$VENV/bin/python" -m pip show --disable-pip-version-check malaria-detect >/dev/null 2>&1; then
    run "${uninstall[@]}"
  fi
  run "$VENV/bin/python" -c 'import numpy, sys; print("numpy", numpy.__version__); sys.exit(numpy.__version__[0] != "1")'
  if [ "$DRY_RUN" = 0 ] && ! "$VENV/bin/python" -c 'import picamera2' 2>/dev/null; then
    note "warning: picamera2 does not import in the venv: camera.source = \"picamera2\" will fail (a USB camera with \"opencv\" still works)"
  fi
}

# The service cannot write to /opt: compile the bytecode now rather than at every start (also after
# --skip-venv, since copy_code removed the old bytecode).
compile_code() {
  if [ -n "$ROOT" ]; then
    return
  fi
  run "$VENV/bin/python" -m compileall -q "$OPT_DIR/device"
}

install_config() {
  local owner=()
  if [ -z "$ROOT" ]; then
    owner=(-o root -g "$SERVICE_USER")
  fi
  run install -d -m 0755 "$ETC_DIR"
  if [ -e "$ETC_DIR/config.toml" ]; then
    note "keeping $ETC_DIR/config.toml (compare with config.toml.example for new keys)"
  else
    run install -m 0640 "${owner[@]}" "$SRC_DIR/systemd/config.toml" "$ETC_DIR/config.toml"
  fi
  run install -m 0644 "$SRC_DIR/systemd/config.toml" "$ETC_DIR/config.toml.example"
}

# Validate the config (and the model it names) with the code just installed, before the service starts on
# it. Refused by an update: the installed version is put back (roll_back_code) and started again, instead of
# the new one crash-looping on the config with the old one deleted. Passed: the old tree is deleted.
check_config() {
  if [ -z "$ROOT" ]; then
    echo "+ (cd $(quote "$OPT_DIR") && $(quote "$VENV/bin/python" -m device check-config "$ETC_DIR/config.toml"))"
    if [ "$DRY_RUN" = 0 ] && ! (cd "$OPT_DIR" && "$VENV/bin/python" -m device check-config "$ETC_DIR/config.toml"); then
      if [ -d "$OPT_DIR.old" ]; then
        roll_back_code
        die "$ETC_DIR/config.toml does not pass with the new version (above): the installed version is put" \
          "back; fix the config for the new version, then run install.sh again"
      fi
      die "$ETC_DIR/config.toml does not pass with this version (above): fix it, then run install.sh again"
    fi
  fi
  run rm -rf -- "$OPT_DIR.old"
}

install_unit() {
  STARTED_AT=$(date '+%Y-%m-%d %H:%M:%S') # this start's setup code, not an earlier one's
  run install -D -m 0644 "$SRC_DIR/systemd/$UNIT" "$UNIT_DIR/$UNIT"
  sys systemctl daemon-reload
  sys systemctl enable "$UNIT"
  if [ -z "$ROOT" ] && [ "$DRY_RUN" = 0 ]; then
    # Type=notify: this waits for the service's READY=1 (or its start timeout).
    echo "+ systemctl restart $UNIT"
    systemctl restart "$UNIT" ||
      die "the service did not start; see: journalctl -u $APP -n 50 --no-pager"
  else
    sys systemctl restart "$UNIT"
  fi
}

print_summary() {
  local port address
  port=$(sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' \
    "$ETC_DIR/config.toml" 2>/dev/null | head -n 1) || true
  address=$(hostname -I 2>/dev/null | awk '{print $1}') || true
  if [ "$DRY_RUN" = 1 ]; then
    note "dry run finished: nothing was changed"
    return
  fi
  note "done. code: $OPT_DIR; config: $ETC_DIR/config.toml; data: $STATE_DIR"
  note "the page: http://${address:-<pi-address>}:${port:-8080} (logs: journalctl -u $APP -f)"
  if [ -z "$ROOT" ]; then
    # Records are kept in UTC and shown in the Pi's time zone: both must be right before the first slide.
    note "clock: $(date '+%Y-%m-%d %H:%M %Z'), time zone $(timedatectl show -p Timezone --value 2>/dev/null ||
      echo unknown) (wrong? see systemd/README.md, The clock)"
    local code
    code=$(journalctl -u "$UNIT" --since "$STARTED_AT" -o cat 2>/dev/null |
      grep -o 'Setup code: [A-Z0-9-]*' | tail -n 1) || true
    if [ -n "$code" ]; then
      note "first run: $code (enter it at /admin/setup to choose the admin password)"
    fi
  fi
}

uninstall() {
  if [ -z "$ROOT" ] && systemctl cat "$UNIT" >/dev/null 2>&1; then
    run systemctl disable --now "$UNIT"
  fi
  run rm -f "$UNIT_DIR/$UNIT"
  sys systemctl daemon-reload
  run rm -rf "$OPT_DIR" "$OPT_DIR.new" "$OPT_DIR.old" # with what an update cut short left beside it
  if [ "$PURGE" = 1 ]; then
    run rm -rf "$ETC_DIR" "$STATE_DIR" "$UNIT_DIR/$UNIT.d"
    if getent passwd "$SERVICE_USER" >/dev/null; then
      sys userdel "$SERVICE_USER"
    fi
    note "removed the service, the code, the config, the data and the user"
  else
    note "removed the service and the code; kept $ETC_DIR and $STATE_DIR (the database and"
    note "images): --uninstall --purge removes them"
  fi
}

main() {
  parse_args "$@"
  set_paths
  check_privileges "$@"
  if [ "$DRY_RUN" = 1 ]; then
    note "dry run: printing the actions, changing nothing"
  fi
  if [ -n "$ROOT" ]; then
    note "installing under $ROOT"
  fi
  if [ "$UNINSTALL" = 1 ]; then
    uninstall
    return
  fi
  check_source
  check_platform
  install_apt_packages
  create_user
  recover_interrupted_swap
  install_venv
  stop_service
  copy_code
  compile_code
  install_config
  check_config
  install_unit
  print_summary
}

main "$@"
