#!/usr/bin/env bash
# Print the README's commands for a fresh machine, one per line, exactly as written:
# the command lines (not comments, not blank) of the first code block under the
# heading "## Two commands on a fresh machine". .ci/run runs what this prints, so a
# README edit that breaks a command fails CI instead of a newcomer's first try.
set -euo pipefail
readme="${1:-README.md}"
awk '
    /^## Two commands on a fresh machine/ { section = 1; next }
    section && /^## /                      { exit }
    section && /^```/                      { if (inblock) exit; inblock = 1; next }
    inblock && $0 !~ /^[[:space:]]*(#|$)/  { print }
' "$readme"
