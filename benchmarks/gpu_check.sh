#!/usr/bin/env bash
# On a CUDA machine: (1) MAML's float64 meta-gradient on the GPU, loop and vmap, against the CPU
# autograd reference of tests/test_maml_gradients.py (conv4 with BatchNorm, 1 and 5 inner steps,
# second and first order); (2) the throughput benchmark on CUDA, where vmap over the meta-batch
# runs too. Takes under 5 minutes on one H100-class GPU. Run from the repository root:
#     benchmarks/setup_learn2learn.sh && benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" - <<'PY'
import sys

import torch

sys.path.insert(0, "tests")
from test_maml_gradients import make_batch, make_net, maml_meta_gradient, reference_meta_gradient, relative_error

assert torch.cuda.is_available(), "no CUDA device"
for steps in (1, 5):
    for first_order in (False, True):
        net, batch = make_net("conv4"), make_batch("conv4")
        want = reference_meta_gradient(net, batch, steps=steps, first_order=first_order, bn_mode="transductive")
        for execution in ("loop", "vmap"):
            got = maml_meta_gradient(
                net.cuda(), batch.to("cuda"), steps=steps, first_order=first_order,
                bn_mode="transductive", execution=execution,
            )
            error = relative_error([g.cpu() for g in got], want)
            print(f"cuda {execution} steps={steps} first_order={first_order}: relative error {error:.2e}")
            assert error < 1e-9
PY
timeout 240 "$python" benchmarks/maml_throughput.py --device cuda --rounds 5
