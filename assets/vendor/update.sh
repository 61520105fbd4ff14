#!/usr/bin/env bash
# Re-fetches the vendored browser assets from the npm registry at the pinned versions, builds
# the co-editing bundle, and writes their checksums to SHA256SUMS. Run it to upgrade (edit the
# versions first) or to verify that the committed files are exactly the published ones, and
# the bundle exactly what these versions build (`git diff` stays empty).
set -euo pipefail
cd "$(dirname "$0")"

GRAPHIQL=3.9.0
REACT=18.3.1
GRAPHQL_WS=6.4.2
FAST_JSON_PATCH=3.1.2

# The co-editing bundle (yjs-editor-*/yjs-editor.mjs), built by esbuild from
# yjs-editor.entry.mjs. Every package whose code ends up in it is pinned here, not only the
# ones the entry names, so npm has no version left to choose: the same versions build the
# same bytes. The build fails if the bundle holds a package not listed here, or another
# version of one, and if one listed here is not in it.
YJS=13.6.33
Y_WEBSOCKET=3.1.0
Y_PROTOCOLS=1.0.7
Y_CODEMIRROR=0.3.6
EDITOR_PACKAGES=(
    "yjs@$YJS" "y-websocket@$Y_WEBSOCKET" "y-protocols@$Y_PROTOCOLS" "y-codemirror.next@$Y_CODEMIRROR"
    lib0@0.2.120
    @codemirror/state@6.7.6 @codemirror/view@6.44.2 @codemirror/commands@6.11.2
    @codemirror/language@6.13.1 @lezer/common@1.5.7 @lezer/highlight@1.2.5
    @marijn/find-cluster-break@1.0.4 style-mod@4.1.5 w3c-keyname@2.2.8
)
ESBUILD=0.28.2

work="$(mktemp -d)"
# The bundle is built in a project of its own, so that nothing of graphiql's dependencies
# can take part in it.
editor="$(mktemp -d)"
trap 'rm -rf "$work" "$editor"' EXIT
(
    cd "$work"
    npm init -y >/dev/null
    npm install --no-audit --no-fund --ignore-scripts \
        "graphiql@$GRAPHIQL" "react@$REACT" "react-dom@$REACT" "graphql-ws@$GRAPHQL_WS" "fast-json-patch@$FAST_JSON_PATCH" >/dev/null
)
m="$work/node_modules"

cp yjs-editor.entry.mjs "$editor/entry.mjs"
(
    cd "$editor"
    npm init -y >/dev/null
    npm install --no-audit --no-fund --ignore-scripts --save-exact \
        "${EDITOR_PACKAGES[@]}" "esbuild@$ESBUILD" >/dev/null
    # ES2020, what the demo's own scripts need anyway (modules, optional chaining); minified,
    # with the licences beside it rather than in it.
    ./node_modules/.bin/esbuild entry.mjs --bundle --format=esm --platform=browser \
        --target=es2020 --minify --legal-comments=none --log-level=warning \
        --banner:js="/* yjs-editor: ${EDITOR_PACKAGES[*]}, bundled by esbuild@$ESBUILD from syncgraph's assets/vendor/yjs-editor.entry.mjs (assets/vendor/update.sh). MIT licences: licenses/ */" \
        --metafile=meta.json --outfile=yjs-editor.mjs
    # Checks what went in against the pins, and copies each package's licence as published.
    node - "${EDITOR_PACKAGES[@]}" <<'EOF'
const fs = require('node:fs');
const path = require('node:path');
const pinned = new Map(process.argv.slice(2).map((spec) => {
  const at = spec.lastIndexOf('@');
  return [spec.slice(0, at), spec.slice(at + 1)];
}));
const inputs = Object.keys(JSON.parse(fs.readFileSync('meta.json', 'utf8')).outputs['yjs-editor.mjs'].inputs);
const used = new Map();
for (const input of inputs) {
  if (input === 'entry.mjs') continue;
  const match = input.match(/^(.*node_modules\/((?:@[^/]+\/)?[^/]+))\//);
  if (!match) throw new Error(`bundled from outside node_modules: ${input}`);
  const [, dir, name] = match;
  if (used.has(name) && used.get(name) !== dir) throw new Error(`two copies of ${name}: ${used.get(name)}, ${dir}`);
  used.set(name, dir);
}
const problems = [];
for (const [name, dir] of used) {
  const { version } = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
  if (pinned.get(name) !== version) problems.push(`bundled ${name}@${version}, pinned: ${pinned.get(name) ?? 'not at all'}`);
}
for (const name of pinned.keys()) if (!used.has(name)) problems.push(`pinned ${name}, but nothing of it is bundled`);
if (problems.length) throw new Error(`update EDITOR_PACKAGES in update.sh:\n  ${problems.join('\n  ')}`);
for (const [name, dir] of [...used].sort(([a], [b]) => (a < b ? -1 : 1))) {
  const licences = fs.readdirSync(dir).filter((file) => /^(licen[cs]e|copying)/i.test(file));
  if (!licences.length) throw new Error(`${name} has no licence file`);
  fs.mkdirSync(path.join('licenses', name), { recursive: true });
  for (const file of licences) fs.copyFileSync(path.join(dir, file), path.join('licenses', name, file));
}
EOF
)
# The folder is named after Yjs and the bundle's own checksum: any change of a version, of
# esbuild or of the entry gives a new path, since browsers cache what is under vendor/ for
# good. The demo imports it by that path (assets/demo/app.js).
bundle="yjs-editor-$YJS-$(sha256sum "$editor/yjs-editor.mjs" | cut -c1-8)"

rm -rf graphiql-* react-* graphql-ws-* fast-json-patch-* yjs-editor-*
mkdir -p "graphiql-$GRAPHIQL" "react-$REACT" "graphql-ws-$GRAPHQL_WS" "fast-json-patch-$FAST_JSON_PATCH" "$bundle"
cp "$m/graphiql/graphiql.min.js" "$m/graphiql/graphiql.min.css" "$m/graphiql/LICENSE" "graphiql-$GRAPHIQL/"
cp "$m/react/umd/react.production.min.js" "$m/react-dom/umd/react-dom.production.min.js" \
    "$m/react/LICENSE" "react-$REACT/"
# graphql-ws's browser ES modules: the client and the one chunk it imports.
cp "$m/graphql-ws/dist/client.js" "$m/graphql-ws/LICENSE.md" "graphql-ws-$GRAPHQL_WS/"
chunk="$(grep -o "common-[A-Za-z0-9_-]*\.js" "$m/graphql-ws/dist/client.js" | sort -u)"
cp "$m/graphql-ws/dist/$chunk" "graphql-ws-$GRAPHQL_WS/"

# fast-json-patch's ES module that applies a patch, and the helpers it imports.
cp "$m/fast-json-patch/module/core.mjs" "$m/fast-json-patch/module/helpers.mjs" \
    "$m/fast-json-patch/LICENSE.txt" "fast-json-patch-$FAST_JSON_PATCH/"

cp -R "$editor/yjs-editor.mjs" "$editor/licenses" "$bundle/"
if ! grep -q "/assets/vendor/$bundle/yjs-editor.mjs" ../demo/*.js; then
    echo "note: the co-editing bundle is now $bundle/yjs-editor.mjs; update the demo's import" >&2
fi

sha256sum graphiql-*/* react-*/* graphql-ws-*/* fast-json-patch-*/* \
    $(find yjs-editor-* -type f | LC_ALL=C sort) > SHA256SUMS
cat SHA256SUMS
