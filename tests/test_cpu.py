"""vaekit.cpu: denormals flushed in every torch thread; a training step stops paying page faults.

The malloc cases run in a fresh interpreter: those settings are per process and cannot be undone.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from vaekit import cpu

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")

# Minor page faults per IWAE step (k = 50, batch 20, the IWAE paper's 1-layer sizes),
# forward and backward, after a few warm-up steps; keep_freed_memory() first if asked.
SCRIPT = """
import json, resource, sys, torch
from vaekit.cpu import keep_freed_memory
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


@linux
def test_steps_reuse_their_pages():
    default = faults_per_step("default")
    kept = faults_per_step("keep")
    assert kept["applied"] is True
    # Measured: about 2700 faults a step with glibc's defaults (3 MiB activations handed back
    # to the kernel every step), 4 to 80 once freed memory is kept (the heap still settling).
    assert kept["faults_per_step"] < 250, (default, kept)
    assert kept["faults_per_step"] < default["faults_per_step"] / 10, (default, kept)


@linux
def test_opt_out_leaves_malloc_alone():
    out = faults_per_step("keep", VAEKIT_KEEP_FREED_MEMORY="0")
    assert out["applied"] is False


x86 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="flushing needs x86 with SSE3")


@x86
def test_denormals_are_flushed_while_inside_and_restored_after():
    tiny = torch.tensor([1e-40])  # a float32 denormal
    with cpu.flush_denormals():
        flushed = (tiny * 1.0).item()
    assert flushed == 0.0
    assert (tiny * 1.0).item() > 0


@x86
def test_denormals_are_flushed_in_every_thread():
    """torch.set_flush_denormal reaches only the calling thread: an element-wise op split over two
    threads then flushes half its denormals. Inside flush_denormals every thread flushes them all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((1 << 20,), 1e-39)  # large enough for torch to split the product over both threads

        def flushed() -> int:
            return int(((x * 1.0) == 0).sum())

        torch.set_flush_denormal(True)  # this thread only, as torch does it
        this_thread_only = flushed()
        torch.set_flush_denormal(False)
        with cpu.flush_denormals():
            everywhere = flushed()
        after = flushed()
        reached = cpu.in_every_thread(lambda: None)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    if reached < 2:
        pytest.skip("no OpenMP runtime to reach here")
    assert this_thread_only < x.numel()  # the other thread kept its denormals: what the fix is for
    assert everywhere == x.numel()
    assert after == 0  # restored in every thread
