"""Starting vaekit: the package imports its exports lazily, and the `vaekit` command handles a
Ctrl-C that comes while it is still loading torch."""

import subprocess
import sys

import pytest

import vaekit
from vaekit.cli import main


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_vaekit_loads_no_torch_until_an_export_is_used():
    done = _python("import sys, vaekit\n"
                   "assert 'torch' not in sys.modules, 'import vaekit loaded torch'\n"
                   "vaekit.fit\n"
                   "assert 'torch' in sys.modules\n")
    assert done.returncode == 0, done.stderr


def test_the_exports_are_the_modules_objects():
    from vaekit import config, data, models, runs, train

    assert (vaekit.fit, vaekit.load, vaekit.build) == (train.fit, runs.load, models.build)
    assert (vaekit.split, vaekit.from_arrays, vaekit.RunConfig) == (data.split, data.from_arrays, config.RunConfig)
    star: dict = {}
    exec("from vaekit import *", star)  # each name of __all__ through __getattr__
    assert {n for n in star if n != "__builtins__"} == set(vaekit.__all__) == {*vaekit._EXPORTS, "__version__"}
    assert vaekit.evaluate.log_px is not None  # submodules as attributes, as when they loaded eagerly
    with pytest.raises(AttributeError, match="'fitt'"):
        vaekit.fitt


def test_ctrl_c_while_torch_loads_ends_in_one_line_and_exit_130():
    # An import hook stands in for the Ctrl-C: it raises KeyboardInterrupt when torch is imported.
    done = _python(
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['vaekit', 'train']\n"
        "from vaekit.__main__ import run\n"
        "run()\n")
    assert done.returncode == 130
    assert done.stderr == "interrupted while starting: nothing was read or written.\n"


def test_version_option(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{vaekit.__version__}\n"
