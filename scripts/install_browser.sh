#!/bin/sh
# Install a headless browser (Debian's chromium) when none is on the PATH: tests/test_report.py renders the HTML
# report in it (screenshot + DOM), and scripts/report_screenshot.py makes the docs' picture with it.
# $HARDMINE_CHROMIUM names another binary. Exits non-zero, saying what to do, when no browser is there and
# none can be installed: `make install` (and so `make test` in CI) must fail loudly rather than skip the test.
if [ -n "$HARDMINE_CHROMIUM" ]; then
  command -v "$HARDMINE_CHROMIUM" >/dev/null 2>&1 && exit 0
  echo "install_browser: HARDMINE_CHROMIUM=$HARDMINE_CHROMIUM is not an executable." >&2
  exit 1
fi
have() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
if have; then exit 0; fi
fail() {
  echo "install_browser: $1" >&2
  echo "install_browser: a headless chromium is needed by the report tests: install the Debian package" \
       "'chromium', or set HARDMINE_CHROMIUM to a chromium/chrome binary." >&2
  exit 1
}
. "$(dirname "$0")/apt_install.sh"
apt_install chromium
have || fail "the package installed but no chromium is on the PATH."
