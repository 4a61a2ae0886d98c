#!/usr/bin/env bash
# Debian's Chromium for the browser test of the A/B page (tests/server/test_server_ab_page.py), installed
# once; `make test` runs this. Playwright drives it (executable /usr/bin/chromium); no browser download.
# Failing to install is reported, not fatal here: the browser test then fails and says why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install-browser: not root and no passwordless sudo; install Debian's chromium package" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get; install Chromium so that /usr/bin/chromium exists" >&2
  exit 0
fi
log=$(mktemp)
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends chromium; } >"$log" 2>&1; then
  echo "install-browser: apt-get install chromium failed:" >&2
  tail -5 "$log" >&2
fi
rm -f "$log"
exit 0
