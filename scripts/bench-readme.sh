#!/usr/bin/env bash
# Puts a benchmark run into the README: the run's bench.md replaces what is between the
# "bench:begin" and "bench:end" markers of README.md (its "###" headings become "####", under
# the README's "## Benchmarks"), and the run's plots and files are copied to docs/bench/ when the
# run wrote them elsewhere.
#
#   sudo target/release/margay-lab --name bench bench --out /tmp/bench
#   scripts/bench-readme.sh /tmp/bench
set -euo pipefail
run_dir=${1:?usage: scripts/bench-readme.sh RUN_DIR (where margay-lab bench wrote bench.md)}
repo=$(cd "$(dirname "$0")/.." && pwd)
readme=$repo/README.md
[[ -f $run_dir/bench.md ]] || { echo "no $run_dir/bench.md: not a margay-lab bench output directory" >&2; exit 1; }
grep -q '^<!-- bench:begin' "$readme" && grep -q '^<!-- bench:end' "$readme" ||
    { echo "README.md has no <!-- bench:begin --> / <!-- bench:end --> markers" >&2; exit 1; }
if [[ $(cd "$run_dir" && pwd) != "$repo/docs/bench" ]]; then
    mkdir -p "$repo/docs/bench"
    cp "$run_dir"/bench.json "$run_dir"/bench.md "$run_dir"/*.png "$repo/docs/bench/"
fi
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
awk -v table="$run_dir/bench.md" '
    /^<!-- bench:begin/ { print; while ((getline line < table) > 0) { sub(/^###/, "####", line); print line }; skip = 1; next }
    /^<!-- bench:end/ { skip = 0 }
    !skip { print }
' "$readme" > "$tmp"
cat "$tmp" > "$readme"
echo "README.md: benchmark tables from $run_dir/bench.md"
