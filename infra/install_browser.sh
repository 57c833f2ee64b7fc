#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian's chromium + chromium-driver), which
# tests/test_viewer.py drives to check that the results page renders. Safe to re-run: does
# nothing when /usr/bin/chromium and /usr/bin/chromedriver are already there. Uses sudo only
# when not root.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "install_browser: chromium and chromedriver already installed"
  exit 0
fi

fail() { echo "install_browser: cannot install chromium and chromium-driver: $*" >&2; exit 1; }

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (not a Debian/Ubuntu machine); install Chromium and chromedriver as /usr/bin/chromium and /usr/bin/chromedriver by hand"
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo)
else
  fail "not root and no password-less sudo; run this script as root"
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q || fail "apt-get update failed (network or apt sources)"
"${SUDO[@]}" apt-get install -y -q chromium chromium-driver \
  || fail "apt-get install failed (see above)"
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] \
  || fail "installed, but /usr/bin/chromium or /usr/bin/chromedriver is missing"
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null)"
