#!/usr/bin/env bash
# Build the documentation site (mkdocs.yml: user guide, and the API reference generated from the
# docstrings) with every warning an error. Installs the docs extra when it is missing.
#
#   bash scripts/docs.sh [SITE_DIR]     default: a temporary folder, removed afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import mkdocs, material, mkdocstrings, mkdocstrings_handlers.python" >/dev/null 2>&1; then
    bash scripts/setup_env.sh docs
fi

site="${1:-}"
if [ -z "$site" ]; then
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
fi
# NO_MKDOCS_2_WARNING: Material's notice about its successor, printed on every build.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site"
