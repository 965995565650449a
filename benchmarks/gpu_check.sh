#!/usr/bin/env bash
# On a CUDA machine: (1) MAML's float64 meta-gradient on the GPU, loop and vmap, against the CPU
# autograd reference of tests/test_maml_gradients.py (mlp and conv4 with BatchNorm, support-set and
# transductive statistics, 1 and 5 inner steps, second and first order), and the compiled loop on the
# second-order cases of the default (support) normalisation (conv4 at 1 and 5 steps, mlp at 1); (2) the throughput benchmark
# on CUDA, where vmap over the meta-batch runs too (the compiled loop is timed on CPU only); (3) every
# registered learner trains, learns and repeats itself on CUDA (benchmarks/gpu_learners.py). Takes
# under 5 minutes on one H100-class GPU.
# Needs only torch (and pytest, which the test module imports). From the repository root:
#     benchmarks/setup_learn2learn.sh && benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" - <<'PY'
import sys

import torch

sys.path.insert(0, "tests")
from test_maml_gradients import make_batch, make_net, maml_meta_gradient, reference_meta_gradient, relative_error

assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
worst = 0.0
for kind in ("mlp", "conv4"):
    for normalisation in ("support", "transductive") if kind == "conv4" else ("support",):
        for steps in (1, 5):
            for first_order in (False, True):
                net, batch = make_net(kind, normalisation), make_batch(kind)
                want = reference_meta_gradient(
                    net, batch, steps=steps, first_order=first_order, normalisation=normalisation
                )
                compiled = first_order is False and normalisation == "support" and (kind == "conv4" or steps == 1)
                for execution in ("loop", "vmap", "compile") if compiled else ("loop", "vmap"):
                    got = maml_meta_gradient(
                        net.cuda(), batch.to("cuda"), steps=steps, first_order=first_order, execution=execution
                    )
                    error = relative_error([g.cpu() for g in got], want)
                    worst = max(worst, error)
                    print(f"cuda {kind} {normalisation} {execution} steps={steps} first_order={first_order}: "
                          f"relative error {error:.2e}")
                    assert error < 1e-9, error
print(f"all CUDA meta-gradients match the float64 CPU reference; worst relative error {worst:.2e}")
PY
timeout 240 "$python" benchmarks/maml_throughput.py --device cuda --rounds 5 --no-compile
"$python" benchmarks/gpu_learners.py --device cuda
