#!/usr/bin/env bash
# Rebuild client_demo/web/vendor/ (the chat page's third-party ES modules) from the pinned
# npm packages in package.json / package-lock.json. The output is checked in, so the relay
# serves the page without npm or any build step; run this only to upgrade a library:
#
#   edit the versions in package.json, `npm install --package-lock-only`, then
#   bash client_demo/vendor/build.sh    (and update the table in web/vendor/README.md)
#
# What it does: `npm ci` (exact lockfile versions, integrity-checked, no install scripts) in a
# temporary directory, then copies each package's ES module build and its licence. The only
# edit to the copied code: the trailing `//# sourceMappingURL=` line is dropped, because the
# relay does not serve .map files and a browser with devtools open would log a 404 for it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../web/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cp "$here/package.json" "$here/package-lock.json" "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --omit=optional >/dev/null)

mkdir -p "$out"
copy_module() {  # copy_module <source file> <dest name>
    grep -v '^//# sourceMappingURL=' "$1" >"$out/$2"
}
copy_module "$work/node_modules/marked/lib/marked.esm.js" marked.esm.js
cp "$work/node_modules/marked/LICENSE" "$out/marked.LICENSE.txt"
copy_module "$work/node_modules/dompurify/dist/purify.es.mjs" purify.es.mjs
cp "$work/node_modules/dompurify/LICENSE" "$out/dompurify.LICENSE.txt"

for pkg in marked dompurify; do
    node -e 'const p=require(process.argv[1]); console.log(`${p.name} ${p.version} (${p.license})`)' \
        "$work/node_modules/$pkg/package.json"
done
echo "written to $(cd "$out" && pwd)"
