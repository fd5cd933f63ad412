#!/bin/sh
# Install dicom-appliance as a systemd service.  Run as root from a checkout:
#
#   sudo sh systemd/install.sh [--extras postgres,azure,s3] [--no-start] [SOURCE]
#
# SOURCE is what pip installs: a checkout folder or a wheel (default: the
# checkout this script is in).  The steps, each skipped when already done,
# so that running it again is harmless:
#
#   1. the system user and group dicom-appliance (no login shell)
#   2. /opt/dicom-appliance/venv, and SOURCE (with its extras) pip-installed
#      into it (again each time: this is how a new version is installed)
#   3. /etc/dicom-appliance/appliance.toml from config/appliance.example.toml
#      and /etc/dicom-appliance/appliance.env from systemd/appliance.env.example,
#      mode 0640, root:dicom-appliance, if absent (never overwritten)
#   4. /var/lib/dicom-appliance (0750, the user's): the working directory,
#      where the default ./data/blobs and ./data/index.db land
#   5. /etc/systemd/system/dicom-appliance.service (replaced by this version's)
#   6. `dicom-appliance migrate`, as the user, with the env file's variables
#   7. if systemd runs this machine: systemctl daemon-reload and
#      systemctl enable --now dicom-appliance (--no-start: enable only)
#
# --root DIR (or DESTDIR=DIR) builds the same tree under DIR instead, as the
# calling user: no user is made, nothing is chowned, systemctl is not called,
# and migrate runs as the caller.  The venv's scripts then name DIR in their
# first line, so such a tree runs where it was built (tests, inspection),
# not copied elsewhere.  PYTHON names the interpreter (default python3, 3.11
# or newer with its venv module; not one under /root or /home, which the
# unit's ProtectHome=yes hides from the service).
set -eu

NAME=dicom-appliance
PROG=${0##*/}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --extras LIST  --no-start  --root DIR  -h|--help"
}

root=${DESTDIR:-}
extras=
start=yes
source=
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a folder"; root=$2; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --extras) [ $# -ge 2 ] || die "--extras needs a list"; extras=$2; shift 2 ;;
        --extras=*) extras=${1#--extras=}; shift ;;
        --no-start) start=no; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$source" ] || die "one SOURCE only"; source=$1; shift ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
checkout=$(dirname "$here")
source=${source:-$checkout}
python=${PYTHON:-python3}
case $extras in
    *[!a-z0-9,_-]*) die "--extras takes names such as postgres,azure,s3" ;;
esac

if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || die "--root / is the machine itself: leave --root out"
    staging=yes
    say "building the tree under $root (no user, no chown, no systemctl)"
else
    staging=no
    [ "$(id -u)" -eq 0 ] || die "run as root (or stage a tree with --root DIR)"
fi

venv=$root/opt/$NAME/venv
etc=$root/etc/$NAME
state=$root/var/lib/$NAME
unit_dir=$root/etc/systemd/system

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$python is missing or older than 3.11 (set PYTHON=...)"
[ -e "$source" ] || die "$source does not exist"

# 1. the user
if [ "$staging" = no ]; then
    if getent passwd "$NAME" >/dev/null; then
        say "user $NAME exists"
    else
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        useradd --system --user-group --home-dir "/var/lib/$NAME" --no-create-home \
            --shell "$nologin" --comment "dicom-appliance service" "$NAME"
        say "made the system user $NAME"
    fi
fi

# 2. the venv and the project; the service runs its interpreter as its user,
# with /home, /root and /run/user hidden (ProtectHome=yes): one installed
# there (pyenv, a user's own build) could not start it
if [ -x "$venv/bin/python" ]; then
    interpreter=$(readlink -f "$venv/bin/python")
else
    # shellcheck disable=SC2016 # Python
    interpreter=$("$python" -c 'import os, sys
print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')
fi
if [ "$staging" = no ]; then
    case $interpreter in
        /root/* | /home/* | /run/user/*)
            hint=
            [ ! -e "$venv" ] || hint=" after removing $venv"
            die "the service could not run $interpreter (ProtectHome=yes hides it):" \
                "use another Python, e.g. PYTHON=/usr/bin/python3$hint" ;;
    esac
fi
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" ||
        die "could not make a venv with $python (Debian: apt-get install python3-venv)"
    say "made $venv"
fi
if [ "$staging" = no ]; then
    runuser -u "$NAME" -- "$venv/bin/python" -c pass ||
        die "user $NAME cannot run $venv/bin/python ($interpreter)"
fi
if [ -d "$source" ]; then
    # built from a copy of what the package is made of: pip would otherwise
    # build in the checkout, leaving build/ there (root's, and a stale module
    # left in build/ would be installed again by the next run)
    [ -f "$source/pyproject.toml" ] || die "$source has no pyproject.toml"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/src"
    for part in pyproject.toml README.md appliance dicomweb dimse_bridge; do
        cp -R "$source/$part" "$work/src/"
    done
    package=$work/src
else
    package=$source  # a wheel or an sdist
fi
spec=$package
[ -z "$extras" ] || spec="${package}[$extras]"
say "pip install $source${extras:+ [$extras]}"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"

# 3. configuration and secrets: the administrator's once they are there
# (ownership and mode kept as the administrator left them)
owned() {  # MODE SOURCE TARGET
    if [ -e "$3" ]; then
        say "kept $3"
    elif [ "$staging" = yes ]; then
        install -m "$1" "$2" "$3"
        say "wrote $3"
    else
        install -m "$1" -o root -g "$NAME" "$2" "$3"
        say "wrote $3"
    fi
}
if [ "$staging" = yes ]; then
    install -d -m 0750 "$etc"
else
    install -d -m 0750 -o root -g "$NAME" "$etc"
fi
owned 0640 "$checkout/config/appliance.example.toml" "$etc/appliance.toml"
owned 0640 "$here/appliance.env.example" "$etc/appliance.env"

# 4. the state folder (systemd's StateDirectory= would make it too)
if [ "$staging" = yes ]; then
    install -d -m 0750 "$state"
else
    install -d -m 0750 -o "$NAME" -g "$NAME" "$state"
fi

# 5. the unit
mkdir -p "$unit_dir"
if cmp -s "$here/$NAME.service" "$unit_dir/$NAME.service"; then
    say "$unit_dir/$NAME.service is current"
else
    install -m 0644 "$here/$NAME.service" "$unit_dir/$NAME.service"
    say "wrote $unit_dir/$NAME.service"
fi

# 6. the index schema, run as the service runs: in the state folder, with
# its umask and only the env file's variables (read as systemd reads an EnvironmentFile:
# KEY=value lines, one pair of surrounding quotes removed)
# shellcheck disable=SC2016 # a Python program, not shell
with_env_file='
import os, sys
env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if not line or line[0] in "#;" or "=" not in line:
        continue
    key, value = (part.strip() for part in line.split("=", 1))
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\x27\"":
        value = value[1:-1]
    env[key] = value
os.execve(sys.argv[2], sys.argv[2:], env)
'
say "dicom-appliance migrate"
if [ "$staging" = yes ]; then
    (umask 027 && cd "$state" && "$venv/bin/python" -c "$with_env_file" "$etc/appliance.env" \
        "$venv/bin/$NAME" migrate --config "$etc/appliance.toml")
else
    (umask 027 && cd "$state" && runuser -u "$NAME" -- "$venv/bin/python" -c "$with_env_file" \
        "$etc/appliance.env" "$venv/bin/$NAME" migrate --config "$etc/appliance.toml")
fi

# 7. the service
if [ "$staging" = yes ]; then
    say "done: $root"
elif [ ! -d /run/systemd/system ]; then
    say "done; systemd is not running on this machine: start" \
        "'$venv/bin/$NAME serve --config $etc/appliance.toml' in $state yourself"
else
    systemctl daemon-reload
    if [ "$start" = no ]; then
        systemctl enable "$NAME"
        say "done; enabled, not started: systemctl start $NAME"
    elif systemctl is-active --quiet "$NAME"; then
        systemctl enable "$NAME"
        say "done; $NAME was running already: systemctl restart $NAME loads this version"
    else
        systemctl enable --now "$NAME"
        say "done; started: systemctl status $NAME, journalctl -u $NAME"
    fi
fi
