#!/usr/bin/env bash
# TransformerLens 3.x compatibility suite.
#
# TL 4 removed HookedTransformer, so TL 3.x cannot share the main .venv: this
# builds a second environment, .tl3venv, with transformer-lens 3.x and runs
# tests/tl3 there (the main suite ignores that folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
TL3_VERSION="${TL3_VERSION:-3.9.0}"
start=$(date +%s)

if [ ! -x .tl3venv/bin/python ]; then
    "$PY" -m venv .tl3venv
fi
pip_q() {  # quiet pip, minus the harmless notes about the local package indexes
    .tl3venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v -e "is ignored: it is neither" -e "requires transformer-lens>=4" || true; }
    return "${PIPESTATUS[0]}"
}
# torch first: on CPU machines this is the local CPU wheel (an unpinned torch would pull CUDA builds)
pip_q "torch==2.13.0"
pip_q "transformer-lens==${TL3_VERSION}" pytest
# our package without its TL 4 pin, plus its light dependencies
pip_q --no-deps -e .
pip_q einops jaxtyping pandas pyarrow tqdm plotly scipy jinja2 "gim-explain==0.1.4"

.tl3venv/bin/python -c "import transformer_lens, importlib.metadata as m; from transformer_lens import HookedTransformer; print('transformer-lens', m.version('transformer-lens'))"
# -o addopts= : the project's pytest config ignores tests/tl3 in the main suite
.tl3venv/bin/python -m pytest tests/tl3 -q -p no:cacheprovider -o addopts="-ra" "$@"
echo "tl3 suite: $(( $(date +%s) - start )) s"
