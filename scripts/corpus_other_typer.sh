#!/usr/bin/env bash
# Run the bad-input corpora against another typer (issue 20: the oldest and newest that
# pyproject.toml allows). Usage: scripts/corpus_other_typer.sh PYTHON
#   e.g. python -m venv /tmp/typer012 && /tmp/typer012/bin/pip install -e . 'typer==0.12.*' pytest
#        scripts/corpus_other_typer.sh /tmp/typer012/bin/python
set -euo pipefail
PY=${1:?usage: $0 PYTHON}
cd "$(dirname "$0")/.."
"$PY" -c 'import typer; print("typer", typer.__version__)'
PYTHONPATH="$PWD" "$PY" -m pytest tests/test_corpus.py tests/test_trust2.py -q -p no:xdist \
  -k 'not corpus_on_other_typer'
