#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Prepares the ignored files a gpu_check.sh call carries (the GPU machine gets no .git):
#   scripts/prepare_gpu_call.sh          .dustin-commit for HEAD (results cite it)
#   scripts/prepare_gpu_call.sh BASE     also .base/: BASE's sources for an A/B run on one
#                                        machine (gpu_check.sh builds it into /tmp/base-site;
#                                        base-bench-<name> stages run against it)
# then run(command="bash scripts/gpu_check.sh ...", carry=[".whl", ".dustin-commit", ".base"]).
set -euo pipefail
cd "$(dirname "$0")/.."
# What the GPU machine builds from: checked for uncommitted changes, archived for a baseline.
sources=(csrc include cmake CMakeLists.txt setup.py pyproject.toml python/dustin)
git diff --quiet HEAD -- "${sources[@]}" \
  || echo "warning: uncommitted source changes; .dustin-commit names HEAD without them" >&2
git rev-parse --short=12 HEAD > .dustin-commit
rm -rf .base
if [ $# -ge 1 ]; then
  base=$(git rev-parse --short=12 "$1^{commit}")
  mkdir .base
  git archive "$base" "${sources[@]}" | tar x -C .base
  rm -rf .base/python/dustin/data  # bundled texts and configs: the benchmarks use this tree's
  echo "$base" > .base/.dustin-commit
  echo "HEAD $(cat .dustin-commit), baseline $base in .base/"
else
  echo "HEAD $(cat .dustin-commit) (no baseline)"
fi
