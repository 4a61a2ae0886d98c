#!/usr/bin/env bash
# Install a pinned checkov (the IaC scanner of tests/operator/test_operator_checkov.py) and print its path.
#
# checkov gets a virtual environment of its own in $BATON_TOOLS_DIR (default: .tools/ at the repository
# root): its pinned dependencies would downgrade packaging, networkx and python-dateutil in the project's.
# Every package is pinned (scripts/checkov-constraints.txt); a second run reuses the venv. Needs python3.
set -euo pipefail

VERSION="3.3.30"  # scripts/checkov-constraints.txt pins its dependencies for this version

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${BATON_TOOLS_DIR:-$root/.tools}"
venv="$tools/checkov-$VERSION"
checkov="$venv/bin/checkov"

if [ -x "$checkov" ] && [ "$(cat "$venv/.installed" 2>/dev/null)" = "$VERSION" ]; then
  echo "$checkov"
  exit 0
fi

# .installed is written last, once checkov has run: an interrupted install is never taken for a finished one.
rm -rf "$venv"
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  -c "$root/scripts/checkov-constraints.txt" "checkov==$VERSION" >&2 || {
  echo "fetch-checkov.sh: pip install checkov==$VERSION failed" >&2; exit 1; }
if [ "$("$checkov" --version 2>/dev/null)" != "$VERSION" ]; then
  echo "fetch-checkov.sh: $checkov does not report version $VERSION" >&2
  exit 1
fi
echo "$VERSION" > "$venv/.installed"
echo "$checkov"
