# Shared by the install_*.sh scripts (sourced, not run): install one Debian package as root or with sudo -n,
# or call the caller's fail() with what went wrong. Usage: apt_install PACKAGE
apt_install() {
  command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine."
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo."
    SUDO="sudo -n"
  fi
  echo "$(basename "$0" .sh): installing Debian package $1" >&2
  $SUDO apt-get update -qq >/dev/null || fail "apt-get update failed."
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null || fail "apt-get install $1 failed."
}
