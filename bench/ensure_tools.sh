#!/bin/sh
# Install what `make bench` needs outside the venv, only when it is missing:
# Orthanc and its DICOMweb plugin (the server compared against) and dcmtk
# (storescu, findscu, movescu, storescp drive both servers), and curl (the
# whole-study WADO-RS retrieve is timed with it).
set -eu

missing=""
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
for tool in storescu findscu movescu storescp echoscu; do
    if [ ! -x "/usr/bin/$tool" ]; then
        missing="$missing dcmtk"
        break
    fi
done
[ -z "$missing" ] && exit 0

echo "bench: installing$missing (Debian/Ubuntu packages)"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: apt-get is not available here; install$missing by hand" >&2
    echo "       (Orthanc 1.10+ with its DICOMweb plugin, and dcmtk), then run make bench again" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "bench: installing packages needs root and sudo is not available;" >&2
        echo "       run as root: apt-get update && apt-get install -y$missing" >&2
        exit 1
    fi
    sudo="sudo"
fi
$sudo apt-get update
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends $missing
