#!/bin/sh
# Install the demo data (Fashion-MNIST IDX files) from Debian's package when they are missing.
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
      echo "install_data: not root and no sudo; install 'dataset-fashion-mnist' with apt-get yourself" >&2; exit 0; fi
  fi
  echo "install_data: installing Debian package dataset-fashion-mnist" >&2
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "install_data: apt-get failed; the demo and real-data tests need 'dataset-fashion-mnist'" >&2
else
  echo "install_data: no apt-get here; get the Fashion-MNIST IDX files and set HARDMINE_FASHION_MNIST" >&2
fi
exit 0
