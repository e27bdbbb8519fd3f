#!/bin/sh
# Install the quality benchmark's second dataset (mlbench's Satellite table, Debian package r-cran-mlbench)
# when it is missing, the way install_data.sh installs Fashion-MNIST. `make eval` runs it first and fails
# loudly, saying what to do, when the data is missing and cannot be installed.
# The file can also be given directly: HARDMINE_SATELLITE_RDA=/path/to/Satellite.rda.
FILE=${HARDMINE_SATELLITE_RDA:-/usr/lib/R/site-library/mlbench/data/Satellite.rda}
if [ -f "$FILE" ]; then exit 0; fi
fail() {
  echo "install_eval_data: $1" >&2
  echo "install_eval_data: the quality benchmark needs mlbench's Satellite.rda: install the Debian package" \
       "'r-cran-mlbench', or set HARDMINE_SATELLITE_RDA to a copy of the file." >&2
  exit 1
}
if [ -n "$HARDMINE_SATELLITE_RDA" ]; then fail "HARDMINE_SATELLITE_RDA=$FILE does not exist."; fi
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine."
SUDO=""
if [ "$(id -u)" != "0" ]; then
  command -v sudo >/dev/null 2>&1 || fail "not root and no sudo."
  SUDO="sudo -n"
fi
echo "install_eval_data: installing Debian package r-cran-mlbench" >&2
$SUDO apt-get update -qq >/dev/null || fail "apt-get update failed."
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq r-cran-mlbench >/dev/null || fail "apt-get install r-cran-mlbench failed."
[ -f "$FILE" ] || fail "the package installed but $FILE is missing."
