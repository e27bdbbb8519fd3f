#!/bin/sh
# Install the demo/test data (Fashion-MNIST IDX files) from Debian's package when they are missing.
# The folder resolves as the library resolves it: $HARDMINE_FASHION_MNIST, else Debian's folder.
# Exits non-zero, saying what to do, when the data is missing and cannot be installed: `make install`
# (and so `make test` and `make demo`) must fail loudly rather than run a suite that skips real-data tests.
DIR=${HARDMINE_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
have() { [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -f "$DIR/train-images-idx3-ubyte" ]; }
if have; then exit 0; fi
fail() {
  echo "install_data: $1" >&2
  echo "install_data: Fashion-MNIST is needed by the demo and the tests: install the Debian package" \
       "'dataset-fashion-mnist', or put its IDX files in a folder and set HARDMINE_FASHION_MNIST to it." >&2
  exit 1
}
if [ -n "$HARDMINE_FASHION_MNIST" ]; then fail "HARDMINE_FASHION_MNIST=$DIR holds no train-images-idx3-ubyte(.gz)."; fi
. "$(dirname "$0")/apt_install.sh"
apt_install dataset-fashion-mnist
have || fail "the package installed but $DIR has no IDX files."
