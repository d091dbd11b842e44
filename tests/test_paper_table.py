"""bench/paper_table.py: the command line reaches each row's config, and finished rows make the table."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("paper_table", Path(__file__).parents[1] / "bench" / "paper_table.py")
paper_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_table)


def _args(*argv):
    return paper_table.parser().parse_args(list(argv))


def test_the_cheap_start_and_its_batch_size_reach_the_rows_that_use_them():
    args = _args("--epochs", "240", "--batch-size", "10", "--warmup", "50000", "--dreg",
                 "--k-start", "5", "150", "--k-start-batch", "20")
    tc = paper_table.row_config("iwae-2l-k50", args).train
    assert (tc.objective, tc.k, tc.batch_size, tc.warmup_steps, tc.dreg) == ("iwae", 50, 10, 50000, True)
    assert (tc.k_start, tc.k_start_epochs, tc.k_start_batch_size) == (5, 150, 20)
    # A row with no more samples than the cheap start trains as it always does.
    for row in ("iwae-1l-k5", "vae-1l-k1"):
        tc = paper_table.row_config(row, args).train
        assert (tc.k_start, tc.k_start_epochs, tc.k_start_batch_size, tc.batch_size) == (0, 0, 0, 10)
    # Without --k-start-batch both phases train at --batch-size.
    tc = paper_table.row_config("iwae-2l-k50", _args("--k-start", "5", "150", "--epochs", "200")).train
    assert (tc.k_start_batch_size, tc.batch_size) == (0, 100)


def test_grad_samples_reach_the_dreg_iwae_rows_only():
    args = _args("--dreg", "--grad-samples", "4")
    assert paper_table.row_config("iwae-2l-k50", args).train.grad_samples == 4
    assert paper_table.row_config("vae-1l-k5", args).train.grad_samples == 0  # an ELBO row: no DReG
    assert paper_table.row_config("iwae-2l-k50", _args("--grad-samples", "4")).train.grad_samples == 0


def test_grad_samples_without_dreg_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--grad-samples .* give --dreg too"):
        paper_table.main(["--rows", "iwae-2l-k50", "--grad-samples", "4", "--out", str(tmp_path / "runs")])


def test_a_k_start_batch_without_a_k_start_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--k-start-batch .* give --k-start K EPOCHS"):
        paper_table.main(["--rows", "iwae-2l-k50", "--k-start-batch", "20", "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_markdown_puts_each_finished_row_beside_the_paper(tmp_path):
    result = {"row": "iwae-2l-k50", "epochs": 240, "best_epoch": 239, "nll": 83.0, "nll_stderr": 0.22,
              "nelbo": 90.0, "active_units": 40, "train_seconds": 7800.4, "eval_seconds": 380.6,
              "recipe": {"train_images": 59_600}}
    (tmp_path / "iwae-2l-k50").mkdir()
    (tmp_path / "iwae-2l-k50" / "paper_result.json").write_text(json.dumps(result))
    line = paper_table.markdown(paper_table.recipe_rows(tmp_path), " (mine)").splitlines()[-1]
    assert line == ("| iwae-2l-k50 (mine) | 59,600 | 240 (239) | 83.00 ± 0.22 | 82.90 | +0.10 | 90.00 | 40 | "
                    "7800 | 381 |")


def test_training_precision_reaches_every_row_and_the_evaluation_keeps_its_own():
    args = _args("--dreg", "--train-precision", "bf16")
    for row in ("iwae-2l-k50", "vae-1l-k1"):
        assert paper_table.row_config(row, args).train.precision == "bf16"
    assert args.precision == "fp32"  # the test NLL stays in fp32 unless --precision says otherwise
    assert paper_table.row_config("iwae-2l-k50", _args()).train.precision == "fp32"


def test_curve_epochs_default_to_the_usual_points_and_can_be_cut_to_the_last_alone():
    assert _args().curve_epochs == sorted(paper_table.CURVE_EPOCHS)
    assert _args("--curve-epochs", "100", "300").curve_epochs == [100, 300]
    assert _args("--curve-epochs").curve_epochs == []  # the run's last epoch is measured all the same


def _finished_row(out: Path, row: str, nll: float, curve: list[float]) -> None:
    run = out / row
    run.mkdir(parents=True)
    result = {"row": row, "epochs": len(curve), "best_epoch": len(curve), "nll": nll, "nll_stderr": 0.2,
              "nelbo": nll + 5, "active_units": 30, "train_seconds": 100.0, "eval_seconds": 10.0,
              "recipe": {"train_images": 59_600}}
    (run / "paper_result.json").write_text(json.dumps(result))
    points = [{"epoch": e + 1, "nll": v} for e, v in enumerate(curve)]
    (run / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))


def test_an_archive_keeps_the_rows_and_curves_of_recipes_whose_directories_are_gone(tmp_path, capsys):
    a, b, archive = tmp_path / "runs" / "recipe_a", tmp_path / "runs" / "recipe_b", tmp_path / "runs.json"
    _finished_row(a, "vae-1l-k1", 86.7, [120.0, 95.0, 88.0])
    _finished_row(a, "iwae-2l-k50", 83.1, [110.0, 90.0])
    _finished_row(b, "iwae-2l-k50", 82.8, [109.0, 89.0, 85.0])
    outs = ["--out", str(a), "--also", str(b)]
    paper_table.main(["--markdown", *outs])
    from_directories = capsys.readouterr().out
    paper_table.main(["--archive-update", "--archive", str(archive), *outs])
    assert "stored 3 rows" in capsys.readouterr().out
    stored = json.loads(archive.read_text())
    assert sorted(stored) == ["iwae-2l-k50 (recipe_a)", "iwae-2l-k50 (recipe_b)", "vae-1l-k1 (recipe_a)"]
    assert [p["nll"] for p in stored["iwae-2l-k50 (recipe_b)"]["curve"]] == [109.0, 89.0, 85.0]

    moved = tmp_path / "elsewhere"
    (tmp_path / "runs").rename(moved)  # the run directories are gone; the same command reads the archive
    paper_table.main(["--markdown", "--archive", str(archive), *outs])
    assert capsys.readouterr().out == from_directories
    assert "| iwae-2l-k50 (recipe_b) | 59,600 | 3 (3) | 82.80 ± 0.20 | 82.90 | -0.10 |" in from_directories
    paper_table.main(["--figure", str(tmp_path / "nll.png"), "--archive", str(archive), *outs])
    assert (tmp_path / "nll.png").stat().st_size > 0

    # A directory that holds rows is read from disk, not from the archive.
    _finished_row(a, "vae-1l-k1", 86.0, [100.0])
    assert paper_table.recipe_rows(a, stored)["vae-1l-k1"]["result"]["nll"] == 86.0
    assert "iwae-2l-k50" not in paper_table.recipe_rows(a, stored)


def test_a_recipe_found_nowhere_is_named_and_the_archive_needs_a_file(tmp_path):
    archive = tmp_path / "runs.json"
    archive.write_text(json.dumps({}))
    with pytest.raises(SystemExit, match=r"no rows for the recipes lost: neither in their directories nor in"):
        paper_table.main(["--markdown", "--archive", str(archive), "--out", str(tmp_path / "lost")])
    with pytest.raises(SystemExit, match="give --archive too"):
        paper_table.main(["--archive-update", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="nothing stored"):
        paper_table.main(["--archive-update", "--archive", str(archive), "--out", str(tmp_path / "empty")])
    assert json.loads(archive.read_text()) == {}
