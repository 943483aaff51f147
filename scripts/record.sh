# Sourced by the benchmarks that record a sitting of their own in docs/benchmarks.md
# (bench-fleet.sh, bench-guest.sh).

record_sitting() { # SECTION_FILE DOC: puts the markdown in SECTION_FILE into DOC as its newest
  # sitting: before the first "### " heading under "## Sittings and analyses", or else before
  # "## How to run". DOC is replaced only once the new text is whole.
  local sec=$1 doc=$2
  awk -v f="$sec" '/^## Sittings and analyses/ { s = 1 } ((s && /^### /) || /^## How to run/) && !done { while ((getline l < f) > 0) print l; done = 1 } { print }' \
    "$doc" >"$doc.new" && mv "$doc.new" "$doc"
}
