#!/usr/bin/env bash
# Runs inside the new conda environment, from the workflow's working directory (the repository
# root): the same installation as `make setup`, pinned by constraints.txt.
set -euo pipefail
pip install --quiet -c constraints.txt -e .
# wilds' pip metadata pulls ogb and more; its image datasets need only what is installed above
pip install --quiet -c constraints.txt --no-deps "wilds==2.0.0"
