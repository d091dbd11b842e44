"""vaekit.memory: a training step stops paying page faults for its temporaries.

Each case runs in a fresh interpreter: the malloc settings are per process and cannot be undone.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")

# Minor page faults per IWAE step (k = 50, batch 20, the IWAE paper's 1-layer sizes),
# forward and backward, after a few warm-up steps; keep_freed_memory() first if asked.
SCRIPT = """
import json, resource, sys, torch
from vaekit.memory import keep_freed_memory
from vaekit.config import ModelConfig
from vaekit.models import build
from vaekit.objectives import iwae
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
model = build(ModelConfig(latent_dim=50, hidden=(200, 200), activation="tanh"), seed=0)
x = (torch.rand(20, 1, 28, 28) < 0.13).float()
def step():
    iwae(model, x, 50).loss.mean().backward()
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"applied": applied, "faults_per_step": faults}))
"""


def faults_per_step(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_steps_reuse_their_pages():
    default = faults_per_step("default")
    kept = faults_per_step("keep")
    assert kept["applied"] is True
    # Measured: about 2700 faults a step with glibc's defaults (3 MiB activations handed back
    # to the kernel every step), 4 to 80 once freed memory is kept (the heap still settling).
    assert kept["faults_per_step"] < 250, (default, kept)
    assert kept["faults_per_step"] < default["faults_per_step"] / 10, (default, kept)


def test_opt_out_leaves_malloc_alone():
    out = faults_per_step("keep", VAEKIT_KEEP_FREED_MEMORY="0")
    assert out["applied"] is False
