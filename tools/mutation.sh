#!/usr/bin/env bash
# Mutation testing (mutmut 3), not in CI: plants small bugs in jaxbn's core one at a time and
# runs the relevant fast tests against each; a mutant that no test kills is a survivor, listed
# with its reason in tests/MUTATION.md.
#
#   tools/mutation.sh            # the committed selection below (see tests/MUTATION.md for its runtime)
#   tools/mutation.sh 'jaxbn._core.ema.x_update_stats__mutmut_*'   # other mutants, by name
#
# Configuration: [tool.mutmut] in pyproject.toml (files that get mutants, the fast test files
# each mutant runs against, a fresh process per mutant: JAX's trace caches must not carry a
# clean trace into a mutant). It runs in a copy of the committed tree (git archive HEAD) under
# ${MUTATION_DIR:-/tmp/jaxbn-mutation}, never in the working tree; mutmut copies that again to
# mutants/. Results: `cd $MUTATION_DIR && mutmut results` (survivors), `mutmut show NAME`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${MUTATION_DIR:-/tmp/jaxbn-mutation}"
# The committed selection: the moment algebra's sampled shift and its merge (every statistic of
# every norm goes through them): about 150 mutants.
default=(
  'jaxbn._core.moments.x__sampled_shift__mutmut_*'
  'jaxbn._core.moments.x_merge__mutmut_*'
)
[ "$#" -gt 0 ] && names=("$@") || names=("${default[@]}")
rm -rf "$dir" && mkdir -p "$dir"
git -C "$root" archive HEAD | tar -x -C "$dir"
cd "$dir"
start=$(date +%s)
nice -n 10 mutmut run --max-children "${MUTATION_JOBS:-2}" "${names[@]}"
echo "mutation run took $(( $(date +%s) - start )) s"
mutmut results
