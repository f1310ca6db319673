#!/usr/bin/env bash
# Run the bad-input corpora against another typer (issue 20: the oldest and newest that
# pyproject.toml allows, typer>=0.12,<0.29), without a second environment:
#   pip install --no-deps --target /tmp/typer012 'typer==0.12.5' 'click==8.1.8'  # typer 0.12 predates click 8.2
#   scripts/corpus_other_typer.sh .venv/bin/python /tmp/typer012
# (the folder goes first on PYTHONPATH, so that typer shadows the installed one). Or pass a
# python whose environment has the other typer, and no folder.
set -euo pipefail
PY=${1:?usage: $0 PYTHON [TYPER_TARGET_DIR]}
EXTRA=${2:-}
cd "$(dirname "$0")/.."
export PYTHONPATH="${EXTRA:+$EXTRA:}$PWD"
"$PY" -c 'import typer; print("typer", typer.__version__, "from", typer.__file__)'
"$PY" -m pytest tests/test_corpus.py tests/test_trust2.py tests/test_cli.py -q -p no:xdist -p no:cacheprovider \
  -k 'not corpus_on_other_typer'
