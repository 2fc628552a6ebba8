#!/usr/bin/env bash
# NumPyro's own tests (test_svi, test_autoguide, contrib/test_module) with IWELBO and
# RenyiELBO substituted for NumPyro's objectives (numpyro_iwae_substitute.py beside this script), under
# NumPyro's own pytest settings (warnings are errors).
#   bash scripts/numpyro_suite/run.sh PATH_TO_NUMPYRO_CHECKOUT [iwelbo|renyi] [pytest args]
# Writes scripts/numpyro_suite/results-MODE.txt (one line per test outcome).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
numpyro=${1:?path to a NumPyro checkout (its test/ folder and pyproject.toml)}
mode=${2:-iwelbo}
shift 2 || shift $#
cd "$numpyro"
NUMPYRO_IWAE_SUBSTITUTE=$mode PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu \
    python -m pytest -p numpyro_iwae_substitute -q -rfE --no-header --color=no -p no:cacheprovider \
    test/infer/test_svi.py test/infer/test_autoguide.py test/contrib/test_module.py "$@" \
    2>&1 | tee "$here/results-$mode.txt" | tail -n 60
