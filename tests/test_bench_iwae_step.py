"""bench/iwae_step.py: its variants are the steps they are named for, and it refuses a row it cannot time."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("iwae_step", Path(__file__).parents[1] / "bench" / "iwae_step.py")
iwae_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(iwae_step)


def test_an_elbo_row_is_refused():
    with pytest.raises(SystemExit, match="give an IWAE row"):
        iwae_step.main(["--row", "vae-1l-k1"])


@pytest.mark.slow
def test_it_times_every_variant_and_prints_their_ratios(capsys):
    iwae_step.main(["--row", "iwae-1l-k5", "--blocks", "1", "--grad-samples", "0", "2", "--log-q", "both", "--hooked",
                    "--precision", "fp32", "bf16", "--profile", "3"])
    out = capsys.readouterr().out
    assert "iwae-1l-k5, k = 5" in out
    for name in ("log q by functional_call", "hooked, grad_samples 0", "hooked, grad_samples 2",
                 "grad_samples 0 (all k)", "\n  grad_samples 2 ", "grad_samples 0 (all k), bf16",
                 "grad_samples 2, bf16"):
        assert name in out
    assert out.count(" x") == 7 and "x1.00" in out  # each against the first
    assert "grad_samples 2, bf16: 3 steps under torch.profiler" in out and "aten::" in out  # the last one's ops
