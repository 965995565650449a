#!/usr/bin/env bash
# Fetches learn2learn 0.2.0's source (the sdist, checked by pip against PyPI's hash) into
# benchmarks/.learn2learn/ for benchmarks/maml_throughput.py. Nothing is built or installed:
# the published package does not build on Python 3.11 (its Cython files are too old) and
# `import learn2learn` imports torchvision, which does not load next to CPU torch. The benchmark
# imports only the pure-Python modules its MAML needs (learn2learn.algorithms.maml,
# .base_learner, learn2learn.utils) straight from this source tree.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
dest="$here/.learn2learn"
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --no-binary :all: learn2learn==0.2.0 -d "$dest"
tar -xzf "$dest/learn2learn-0.2.0.tar.gz" -C "$dest"
echo "learn2learn source at $dest/learn2learn-0.2.0"
