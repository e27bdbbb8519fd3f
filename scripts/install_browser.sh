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
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine."
SUDO=""
if [ "$(id -u)" != "0" ]; then
  command -v sudo >/dev/null 2>&1 || fail "not root and no sudo."
  SUDO="sudo -n"
fi
echo "install_browser: installing Debian package chromium" >&2
$SUDO apt-get update -qq >/dev/null || fail "apt-get update failed."
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null || fail "apt-get install chromium failed."
have || fail "the package installed but no chromium is on the PATH."
