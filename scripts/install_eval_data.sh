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
. "$(dirname "$0")/apt_install.sh"
apt_install r-cran-mlbench
[ -f "$FILE" ] || fail "the package installed but $FILE is missing."
