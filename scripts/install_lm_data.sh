#!/bin/sh
# Install the language-model demo's corpus (Debian's `fortunes` package: quotations in
# /usr/share/games/fortunes/, one file per topic, quotes separated by lines holding only "%") when it is
# missing, the way install_data.sh installs Fashion-MNIST. `make demo-lm` runs it first and fails loudly,
# saying what to do, when the corpus is missing and cannot be installed.
# The directory can also be given directly: HARDMINE_FORTUNES=/path/to/fortunes (files of %-separated quotes).
DIR=${HARDMINE_FORTUNES:-/usr/share/games/fortunes}
if [ -f "$DIR/fortunes" ] || { [ -n "$HARDMINE_FORTUNES" ] && [ -d "$DIR" ]; }; then exit 0; fi
fail() {
  echo "install_lm_data: $1" >&2
  echo "install_lm_data: the language-model demo needs the quotations of the Debian package 'fortunes'" \
       "(/usr/share/games/fortunes): install it, or set HARDMINE_FORTUNES to a directory of files of" \
       "%-separated quotes." >&2
  exit 1
}
if [ -n "$HARDMINE_FORTUNES" ]; then fail "HARDMINE_FORTUNES=$DIR does not exist."; fi
. "$(dirname "$0")/apt_install.sh"
apt_install fortunes
[ -f "$DIR/fortunes" ] || fail "the package installed but $DIR/fortunes is missing."
