#!/usr/bin/env bash
# Re-fetches the vendored browser assets from the npm registry at the pinned versions and
# writes their checksums to SHA256SUMS. Run it to upgrade (edit the versions first) or to
# verify that the committed files are exactly the published ones (`git diff` stays empty).
set -euo pipefail
cd "$(dirname "$0")"

GRAPHIQL=3.9.0
REACT=18.3.1
GRAPHQL_WS=6.4.2
FAST_JSON_PATCH=3.1.2

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(
    cd "$work"
    npm init -y >/dev/null
    npm install --no-audit --no-fund --ignore-scripts \
        "graphiql@$GRAPHIQL" "react@$REACT" "react-dom@$REACT" "graphql-ws@$GRAPHQL_WS" "fast-json-patch@$FAST_JSON_PATCH" >/dev/null
)
m="$work/node_modules"

rm -rf graphiql-* react-* graphql-ws-* fast-json-patch-*
mkdir -p "graphiql-$GRAPHIQL" "react-$REACT" "graphql-ws-$GRAPHQL_WS" "fast-json-patch-$FAST_JSON_PATCH"
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

sha256sum graphiql-*/* react-*/* graphql-ws-*/* fast-json-patch-*/* > SHA256SUMS
cat SHA256SUMS
