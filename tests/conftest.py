import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    """Every test gets its own empty data cache and a fixed seed."""
    monkeypatch.setenv("VAEKIT_HOME", str(tmp_path_factory.mktemp("vaekit_home")))
    torch.manual_seed(0)
