"""The CLI end to end on a tiny synthetic data set: in-process, and once as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vaekit.cli import main

RUN_FILES = {"config.json", "model.safetensors", "last.safetensors", "state.safetensors", "metrics.jsonl",
             "summary.json", "report.html", "reconstructions.png", "samples.png", "latent.png",
             "interpolations.png", "traversal.png", "training.png"}


@pytest.fixture
def npz(tmp_path):
    """300 binary-ish 8×8 'images' of three blob positions, with labels."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.zeros((300, 8, 8), np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 3, 2:6] = 255
    x = np.where(rng.random(x.shape) < 0.05, 255 - x, x).astype(np.uint8)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y)
    return path


def train_args(out, data, *extra):
    return ["train", "--out", str(out), "--data", str(data), "--latent-dim", "2", "--hidden", "32",
            "--epochs", "1", "--batch-size", "50", "--no-progress", *extra]


def test_train_writes_every_file_and_other_commands_work(tmp_path, npz, capsys):
    from vaekit import runs

    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    assert RUN_FILES | {"manifold.png"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1
    # the summary's ELBO is the best epoch's validation ELBO: the same weights, images and noise
    (record,) = [m for m in runs.read_jsonl(run / "metrics.jsonl") if m["epoch"] == summary["best_epoch"]]
    assert summary["valid"]["elbo"] == pytest.approx(-record["valid_nelbo"], rel=1e-6)
    html = (run / "report.html").read_text()
    assert all(f'src="{name}"' in html for name in RUN_FILES if name.endswith(".png"))

    assert main(["eval", str(run), "--split", "valid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "valid" and result["n_images"] == 30
    assert result["nelbo"] == pytest.approx(result["recon"] + result["kl"])
    assert result["nelbo"] == pytest.approx(summary["valid"]["nelbo"])  # fixed protocol: same number again
    assert main(["eval", str(run), "--split", "valid", "--k", "100", "--json", "--no-progress"]) == 0
    is_result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("nll", "nll_stderr", "bits_per_dim", "active_units", "kl_per_dim", "k", "binarization",
                "binarize_seed", "seed"):
        assert key in is_result
    assert is_result["k"] == 100 and len(is_result["kl_per_dim"]) == 2
    assert is_result["nll"] < is_result["nelbo"]  # L_100 is tighter than the ELBO
    # the k = 5000 result above stays on record: k = 100 over the same images is a quicker look
    assert json.loads((run / "summary.json").read_text())["valid_eval"] == result
    assert main(["eval", str(run), "--split", "valid", "--k", "100", "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["nll"] == is_result["nll"]  # same seed, same protocol: exactly the same number

    assert main(["sample", str(run), "--n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["reconstruct", str(run), "--split", "valid", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0

    run2 = tmp_path / "run2"
    assert main(train_args(run2, npz, "--latent-dim", "3")) == 0
    assert not (run2 / "manifold.png").exists()  # only for a 2-D latent space
    assert main(["compare", str(run), str(run2), "--out", str(tmp_path / "cmp")]) == 0
    assert {"compare.png", "rate_distortion.png", "report.html"} <= {p.name for p in (tmp_path / "cmp").iterdir()}
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "../run/report.html" in page and 'src="rate_distortion.png"' in page


def test_training_on_drops_eval_results_of_replaced_weights_and_says_when_nothing_is_left(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    assert main(["eval", str(run), "--split", "valid", "--k", "5", "--no-progress"]) == 0
    assert main(["plot", str(run)]) == 0  # the same weights: their result stays
    assert "valid_eval" in json.loads((run / "summary.json").read_text())
    assert "log p(x)" in (run / "report.html").read_text()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "has finished its 1 epochs, so there is nothing to train" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == 3  # a later epoch's weights are the run's now, and their result is not known
    assert "valid_eval" not in summary and "log p(x)" not in (run / "report.html").read_text()


def test_figures_of_data_beyond_0_1_span_its_range(tmp_path, capsys):
    from vaekit import figures, runs

    x = np.random.default_rng(0).uniform(-5, 5, (200, 6, 6)).astype(np.float32)
    x[:, :3] = -5.0  # every image half at the data's minimum
    data = tmp_path / "wide.npz"
    np.savez(data, x=x)
    run = tmp_path / "run"
    assert main(train_args(run, data, "--likelihood", "gaussian")) == 0
    assert "nats (of a density: Gaussian decoder); report" in capsys.readouterr().out
    assert main(["eval", str(run), "--k", "5", "--no-progress", "--json"]) == 0
    assert "a Gaussian decoder: nll is -log of a density" in json.loads(capsys.readouterr().out)["note"]
    about = json.loads((run / "summary.json").read_text())["valid"]
    lo, hi = about["display_range"]
    assert lo == -5.0 and 4.5 < hi <= 5.0
    assert f"drawn from {lo:.3g} (black) to {hi:.3g} (white)" in (run / "report.html").read_text()
    model = runs.load(run)
    shown = figures.run_figures(model, torch.from_numpy(x[:20]).unsqueeze(1), None, [])["reconstructions.png"]
    mosaic = np.asarray(shown.axes[0].get_images()[0].get_array())
    top = mosaic[1:7, 1:7]  # the first original, drawn: its −5 half black, the rest grey, none clipped white
    assert (top[:3] == 0).all() and 0 < top[3:].min() and top[3:].max() < 1
    assert figures.display_range(torch.rand(5, 1, 2, 2)) is None  # [0, 1] data is drawn as it is


def test_a_run_whose_best_weights_give_a_non_finite_elbo_fails(tmp_path, npz, capsys, monkeypatch):
    from vaekit import train

    real = train.elbo_means
    monkeypatch.setattr(train, "elbo_means", lambda *a, **kw: {**real(*a, **kw), "nelbo": float("inf")})
    assert main(train_args(tmp_path / "r", npz)) == 2
    err = capsys.readouterr().err
    assert "training diverged: the valid ELBO of its best weights is -inf" in err and "scale them first" in err


def test_conditional_training_refuses_labels_that_skip_classes(tmp_path, npz, capsys):
    d = np.load(npz)
    sparse = tmp_path / "sparse.npz"
    np.savez(sparse, x=d["x"], y=np.where(d["y"] == 2, 1000, d["y"]))
    assert main(train_args(tmp_path / "c", sparse, "--conditional")) == 2
    err = capsys.readouterr().err
    assert "labels run up to 1000" in err and "998 of those labels never occur" in err and "numpy.unique" in err
    assert not (tmp_path / "c").exists()
    # dense labels with one class only outside the training split: trained, with a note
    y = d["y"].copy()
    y[:] = np.where(y == 2, 1, y)
    y[0] = 2  # the only 2; the 10 % validation split (seed 0) may or may not take it
    only = tmp_path / "only.npz"
    np.savez(only, x=d["x"], y=y)
    assert main(train_args(tmp_path / "d", only, "--conditional")) == 0
    from vaekit.data import load_splits

    from vaekit import runs

    train_has_2 = 2 in set(load_splits(runs.load_config(tmp_path / "d").data).train.y.tolist())
    assert ("no training example has label 2" in capsys.readouterr().err) == (not train_has_2)


def test_the_log_names_what_was_trained_on(tmp_path, npz, capsys):
    assert main(train_args(tmp_path / "iw", npz, "--objective", "iwae")) == 0
    assert "the IWAE bound with k = 1 is the ELBO" in capsys.readouterr().err
    assert main(train_args(tmp_path / "pm", npz, "--preset", "poor-man")) == 0
    err = capsys.readouterr().err
    assert "train loss" in err and "(norm penalty)" in err and "train -ELBO" not in err
    record = json.loads((tmp_path / "pm" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_sse", "train_code_norm", "train_loss", "valid_nelbo"} <= set(record)  # valid: nats of the model
    assert not {"train_nelbo", "train_recon", "train_kl"} & set(record)  # the penalty's terms are not nats


def test_a_quick_eval_does_not_replace_a_more_thorough_one(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    assert main(["eval", str(run), "--split", "valid", "--k", "20", "--no-progress", "--json"]) == 0
    thorough = json.loads((run / "summary.json").read_text())["valid_eval"]
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "valid", "--k", "1", "--limit", "5", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "not recorded" in err and "k = 20 over 30 images" in err and "one-sample ELBO" in out
    assert json.loads((run / "summary.json").read_text())["valid_eval"] == thorough
    assert main(["eval", str(run), "--split", "valid", "--k", "40", "--no-progress"]) == 0  # more samples: kept
    assert json.loads((run / "summary.json").read_text())["valid_eval"]["k"] == 40


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_an_undefined_stderr_is_written_as_null_not_nan(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "valid", "--k", "5", "--limit", "1", "--no-progress", "--json"]) == 0
    printed = _strict_json(capsys.readouterr().out)
    assert printed["n_images"] == 1 and printed["nll_stderr"] is None and printed["nll"] > 0
    assert _strict_json((run / "summary.json").read_text())["valid_eval"]["nll_stderr"] is None
    report = (run / "report.html").read_text()  # rewritten by eval from the summary, null and all
    assert "by importance sampling with k = 5: " in report and "nats per image (over 1 image;" in report


def test_resume_continues_a_run(tmp_path, npz):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["epochs"] = 2  # ask for one more epoch
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("args, words", [
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/missing.npz"], ["missing.npz"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--latent-dim", "0"], ["latent_dim"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--batch-size", "100000"], ["batch", "--batch-size 270 or less"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--likelihood", "poisson"], ["bernoulli", "gaussian"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--set", "model.latnt=2"], ["model.latnt"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--hidden", "a,b"], ["--hidden"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--hidden", ""], ["--hidden", "got ''"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--hidden", "256,,128"], ["--hidden", "got '256,,128'"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--preset", "nope"], ["preset"]),
    (["eval", "{tmp}/no-such-run"], ["does not exist"]),
    (["sample", "{tmp}/model.pt"], ["pickle"]),
    (["data", "fetch", "cifar"], ["mnist"]),
    (["train", "--out", "{tmp}/r", "--data", "{npz}", "--threads", "0"], ["--threads"]),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, npz, capsys, args, words):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    args = [a.format(tmp=tmp_path, npz=npz) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for w in words:
        assert w in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_bad_options_of_the_commands_on_a_run_exit_2_and_write_nothing(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    out = tmp_path / "out"
    cases = [
        (["eval", str(run), "--device", "tpu"], ["--device", "tpu"]),
        (["reconstruct", str(run), "--split", "bogus", "--out", f"{out}/r.png"], ["--split", "bogus"]),
        (["reconstruct", str(run), "--n", "0", "--out", f"{out}/r.png"], ["--n", "got 0"]),
        (["reconstruct", str(run), "--n", "100000", "--out", f"{out}/r.png"], ["--n", "256"]),
        (["sample", str(run), "--n", "-5", "--out", f"{out}/s.png"], ["--n", "got -5"]),
        (["sample", str(run), "--out", f"{out}/s.jpg"], ["--out", ".png"]),
        (["sample", str(run), "--seed", str(2**64), "--out", f"{out}/s.png"], ["--seed", "between 0 and"]),
        (["eval", str(run), "--seed", "-1", "--k", "2"], ["--seed", "got -1"]),
        (["compare", str(run), str(run), "--n", "0", "--out", str(out)], ["--n"]),
        (["encode", str(run), "--split", "valid", "--out", f"{out}/codes.txt"], ["--out", ".npz"]),
        (["interpolate", str(run), "0", "30", "--split", "valid", "--out", f"{out}/i.png"], ["30", "0 to 29"]),
        (["interpolate", str(run), "-1", "3", "--split", "valid", "--out", f"{out}/i.png"], ["-1", "0 to 29"]),
        (["encode", str(run), "--split", "auto", "--out", f"{out}/codes.npz"], ["--split"]),
        (["interpolate", str(run), "0", "1", "--split", "valid", "--steps", "1", "--out", f"{out}/i.png"],
         ["--steps"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", str(run), "--device", "cuda"], ["CUDA", "--device cpu"]))
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, args
        assert all(w in err for w in words), (args, err)
    assert not out.exists()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # the run is untouched

    # a figure into a folder that does not exist yet: the folder is made
    assert main(["sample", str(run), "--n", "4", "--out", f"{out}/new/s.png"]) == 0
    assert (out / "new" / "s.png").stat().st_size > 0


def test_encode_writes_the_posterior_means_and_labels_and_interpolate_a_figure(tmp_path, npz):
    from vaekit import generate, runs
    from vaekit.data import load_splits
    from vaekit.train import eval_set

    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    assert main(["encode", str(run), "--split", "valid", "--out", str(tmp_path / "codes.npz")]) == 0
    codes = np.load(tmp_path / "codes.npz")
    cfg = runs.load_config(run)
    valid = load_splits(cfg.data).valid
    expected = generate.encode_mean(runs.load(run), eval_set(valid, cfg.data))
    assert codes["z"].shape == (30, 2)
    np.testing.assert_allclose(codes["z"], expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(codes["y"], valid.y.numpy())

    assert main(["interpolate", str(run), "3", "7", "--split", "valid", "--steps", "6"]) == 0
    assert (run / "interpolation_valid_3_7.png").stat().st_size > 0
    assert main(["interpolate", str(run), "3", "7"]) == 0  # the default split: the short name
    assert (run / "interpolation_3_7.png").stat().st_size > 0
    # the report's reconstructions.png stays the default split's; other images get files of their own
    report_figure = (run / "reconstructions.png").read_bytes()
    assert main(["reconstruct", str(run), "--split", "train", "--n", "4"]) == 0
    assert main(["reconstruct", str(run), "--data", str(npz), "--n", "4"]) == 0
    assert (run / "reconstructions_train.png").stat().st_size > 0
    assert (run / f"reconstructions_of_{npz.stem}.png").stat().st_size > 0
    assert (run / "reconstructions.png").read_bytes() == report_figure

    # a conditional model: each image is encoded with its own label
    cvae = tmp_path / "cvae"
    assert main(train_args(cvae, npz, "--conditional")) == 0
    assert main(["encode", str(cvae), "--split", "valid"]) == 0
    z = np.load(cvae / "codes_valid.npz")["z"]
    model = runs.load(cvae)
    np.testing.assert_allclose(z, generate.encode_mean(model, eval_set(valid, cfg.data), y=valid.y).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(z, generate.encode_mean(model, eval_set(valid, cfg.data), y=(valid.y + 1) % 3).numpy())
    assert main(["interpolate", str(cvae), "0", "1", "--split", "valid"]) == 0


def test_eval_says_when_a_bernoulli_decoder_scores_grey_images(tmp_path, npz, capsys):
    """A Bernoulli 'log p(x)' of grey values is a cross-entropy, not a likelihood: eval says so, and
    only then (not for 0/1 images, nor for grey images the run binarizes)."""
    with np.load(npz) as f:
        x, y = f["x"], f["y"]
    grey = tmp_path / "grey.npz"
    np.savez(grey, x=(x // 2).astype(np.uint8), y=y)  # values 0 and 127
    for data, binarize, noted in ((grey, "none", True), (grey, "dynamic", False), (npz, "none", False)):
        run = tmp_path / f"{data.stem}_{binarize}"
        assert main(train_args(run, data, "--binarize", binarize)) == 0
        capsys.readouterr()
        assert main(["eval", str(run), "--split", "valid", "--k", "2", "--json", "--no-progress"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert ("grey, not 0/1" in result.get("note", "")) == noted, (data, binarize)


def test_eval_of_a_poor_mans_vae_says_what_its_nll_is(tmp_path, npz, capsys):
    run = tmp_path / "pm"
    assert main(train_args(run, npz, "--preset", "poor-man")) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "valid", "--k", "2", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "norm penalty, not this model's ELBO" in result["note"] and "0.1^2 I" in result["note"]


def test_eval_and_encode_take_other_data_and_score_each_image(tmp_path, npz, capsys):
    from vaekit import runs
    from vaekit.data import load_splits

    run = tmp_path / "run"
    assert main(train_args(run, npz, "--epochs", "20")) == 0  # the later --epochs counts
    assert runs.load_config(run).train.epochs == 20
    valid = load_splits(runs.load_config(run).data).valid
    x = valid.x.squeeze(1).numpy()
    same = tmp_path / "same.npz"
    np.savez(same, x=x, y=valid.y.numpy())
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "valid", "--k", "50", "--json", "--no-progress"]) == 0
    on_split = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = (run / "summary.json").read_text()
    scores = tmp_path / "out" / "scores.npz"
    assert main(["eval", str(run), "--data", str(same), "--k", "50", "--scores", str(scores), "--json",
                 "--no-progress"]) == 0
    on_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same images, binarized the same way, with the same samples: the same estimate
    assert on_file["nll"] == on_split["nll"] and on_file["data"] == str(same) and "split" not in on_file
    per_image = np.load(scores)
    assert per_image["nll"].shape == (30,) and per_image["nll"].mean() == pytest.approx(on_split["nll"])
    np.testing.assert_array_equal(per_image["y"], valid.y.numpy())
    assert (run / "summary.json").read_text() == summary  # other data leaves the run as it was

    # the scores rank what the model has not seen as unlikely: inverted images score far worse
    odd = tmp_path / "odd.npz"
    np.savez(odd, x=np.concatenate([x, 255 - x]))
    assert main(["eval", str(run), "--data", str(odd), "--k", "20", "--scores", str(scores), "--no-progress",
                 "--overwrite"]) == 0
    nll = np.load(scores)["nll"]
    assert nll[30:].min() > nll[:30].max()

    assert main(["encode", str(run), "--split", "valid"]) == 0
    assert main(["encode", str(run), "--data", str(same)]) == 0
    np.testing.assert_array_equal(np.load(run / "codes_of_same.npz")["z"], np.load(run / "codes_valid.npz")["z"])
    assert main(["reconstruct", str(run), "--data", str(same), "--n", "4", "--out", str(tmp_path / "r.png")]) == 0
    assert main(["interpolate", str(run), "0", "29", "--data", str(same), "--out", str(tmp_path / "i.png")]) == 0
    assert main(["reconstruct", str(run), "--split", "valid", "--n", "4", "--out", str(tmp_path / "rv.png")]) == 0
    assert (tmp_path / "r.png").read_bytes() == (tmp_path / "rv.png").read_bytes()  # the same images, the same figure
    assert (tmp_path / "i.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["interpolate", str(run), "0", "30", "--data", str(same)]) == 2
    assert f"image B = 30 is out of range: {same} has 30 images" in capsys.readouterr().err

    # data the model cannot take, or two sources at once: exit 2, a message, nothing written
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((5, 6, 6), np.uint8))
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(small), "--scores", str(tmp_path / "no.npz")]) == 2
    assert "shape [1, 6, 6], and this model takes [1, 8, 8]" in capsys.readouterr().err
    assert main(["encode", str(run), "--data", str(same), "--split", "valid", "--out", str(tmp_path / "no.npz")]) == 2
    assert "drop --split" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.npz")]) == 2
    before = same.read_bytes()
    assert main(["eval", str(run), "--data", str(same), "--scores", str(same), "--k", "2"]) == 2
    assert main(["encode", str(run), "--data", str(same), "--out", str(same)]) == 2
    assert "is the --data" in capsys.readouterr().err and same.read_bytes() == before
    # nor the run's own training data, named or not
    before = npz.read_bytes()
    assert main(["encode", str(run), "--out", str(npz)]) == 2
    assert "is the run's training data" in capsys.readouterr().err
    assert main(["eval", str(run), "--k", "2", "--scores", str(npz)]) == 2
    assert npz.read_bytes() == before


def test_no_output_file_goes_into_the_image_folder_a_run_trained_on(tmp_path, capsys):
    from vaekit import runs
    from vaekit.cli import _not_the_input
    from vaekit.config import RunConfig
    from vaekit.errors import ConfigError

    folder = tmp_path / "pets"
    run = tmp_path / "run"
    run.mkdir()
    runs.save_config(run, RunConfig.from_dict({"data": {"source": str(folder)}}))
    with pytest.raises(ConfigError, match="is inside the run's training data"):
        _not_the_input(folder / "cat" / "codes.npz", None, run)
    _not_the_input(tmp_path / "codes.npz", None, run)  # beside the folder: fine
    # a class folder or an image that is a link: its target is the data too
    (tmp_path / "store" / "cats").mkdir(parents=True)
    (tmp_path / "store" / "a.png").write_bytes(b"an image")
    (folder / "dog").mkdir(parents=True)
    (folder / "cat").symlink_to(tmp_path / "store" / "cats")
    (folder / "dog" / "a.png").symlink_to(tmp_path / "store" / "a.png")
    with pytest.raises(ConfigError, match="is inside the run's training data"):
        _not_the_input(tmp_path / "store" / "cats" / "x.png", None, run)
    with pytest.raises(ConfigError, match="is the run's training data"):
        _not_the_input(tmp_path / "store" / "a.png", None, run)
    _not_the_input(tmp_path / "store" / "b.png", None, run)
    (folder / "loop").symlink_to(folder / "loop")  # a link to itself: the loader skips it, and so does the check
    _not_the_input(tmp_path / "store" / "b.png", None, run)


def test_a_file_named_by_out_is_replaced_only_with_overwrite(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    mine = {"s.png": b"my picture", "r.png": b"my picture", "i.png": b"my picture", "c.npz": b"my table",
            "scores.npz": b"my table"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    commands = [
        ["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")],
        ["reconstruct", str(run), "--n", "4", "--out", str(tmp_path / "r.png")],
        ["interpolate", str(run), "0", "1", "--out", str(tmp_path / "i.png")],
        ["encode", str(run), "--out", str(tmp_path / "c.npz")],
        ["eval", str(run), "--k", "2", "--no-progress", "--scores", str(tmp_path / "scores.npz")],
    ]
    for args in commands:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "already exists" in err and "--overwrite" in err, (args, err)
    assert all((tmp_path / name).read_bytes() == content for name, content in mine.items())
    for args in commands:
        assert main([*args, "--overwrite"]) == 0, args
    assert all((tmp_path / name).read_bytes() != content for name, content in mine.items())
    assert set(np.load(tmp_path / "c.npz")) == {"z", "y"} and set(np.load(tmp_path / "scores.npz")) >= {"nll"}
    # --overwrite never lets an output replace the run's training data
    before = npz.read_bytes()
    assert main(["encode", str(run), "--out", str(npz), "--overwrite"]) == 2
    assert "is the run's training data" in capsys.readouterr().err and npz.read_bytes() == before


def test_outputs_stay_out_of_the_data_and_the_mnist_cache(tmp_path, npz, capsys, monkeypatch):
    from PIL import Image

    from vaekit import runs
    from vaekit.cli import _not_the_input
    from vaekit.config import RunConfig
    from vaekit.errors import ConfigError

    # a run of MNIST: its data is the cache, so nothing may be written there
    monkeypatch.setenv("VAEKIT_HOME", str(tmp_path / "home"))
    mnist_run = tmp_path / "mnist_run"
    mnist_run.mkdir()
    runs.save_config(mnist_run, RunConfig())
    with pytest.raises(ConfigError, match="is inside the run's training data"):
        _not_the_input(tmp_path / "home" / "mnist" / "codes.npz", None, mnist_run)
    with pytest.raises(ConfigError, match="is the run's training data"):
        _not_the_input(tmp_path / "home" / "mnist", None, mnist_run)
    _not_the_input(tmp_path / "home" / "codes.npz", None, mnist_run)  # beside the cache folder: fine

    # a run may not be put inside the image folder it trains on
    pets = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (pets / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(pets / c / f"{i}.png")
    before = sorted(p.relative_to(pets) for p in pets.rglob("*"))
    assert main(train_args(pets / "run", pets)) == 2
    assert "is inside the training data" in capsys.readouterr().err
    assert sorted(p.relative_to(pets) for p in pets.rglob("*")) == before

    # compare: not into a run's data, and what a named folder holds is kept without --overwrite
    run = tmp_path / "run"
    assert main(train_args(run, pets)) == 0
    assert main(["compare", str(run), "--out", str(pets / "cat")]) == 2
    assert "is inside the run's training data" in capsys.readouterr().err
    # --data mnist is the path ./mnist (not the cache), and it is guarded like any other
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").symlink_to(pets)
    assert main(["reconstruct", str(run), "--data", "mnist", "--out", "mnist/cat/new.png"]) == 2
    assert "is inside the --data" in capsys.readouterr().err
    assert sorted(p.relative_to(pets) for p in pets.rglob("*")) == before
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    (cmp / "report.html").write_text("my notes")
    assert main(["compare", str(run), "--out", str(cmp)]) == 2
    assert "already holds report.html" in capsys.readouterr().err
    assert (cmp / "report.html").read_text() == "my notes" and not (cmp / "compare.png").exists()
    assert main(["compare", str(run), "--out", str(cmp), "--overwrite"]) == 0
    assert (cmp / "compare.png").exists() and "my notes" not in (cmp / "report.html").read_text()


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, npz, capsys, monkeypatch):
    import errno
    import tempfile

    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # what a folder one may not write to does (root may)
    for args in (["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")],
                 ["encode", str(run), "--out", str(tmp_path / "c.npz")],
                 ["compare", str(run), "--out", str(tmp_path / "cmp")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "cannot write into" in err and "Permission denied" in err and "Traceback" not in err, err


def test_out_with_a_tilde_the_shell_left_is_the_home_folder(tmp_path, npz, monkeypatch):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(run), "--n", "4", "--out=~/s.png"]) == 0
    assert (tmp_path / "home" / "s.png").stat().st_size > 0 and not (tmp_path / "~").exists()


def test_a_runs_config_json_starts_a_new_run_and_bad_config_files_are_named(tmp_path, npz, capsys):
    from vaekit import runs

    first = tmp_path / "first"
    assert main(train_args(first, npz, "--set", "model.activation=tanh")) == 0
    second = tmp_path / "second"
    assert main(["train", "--out", str(second), "--config", str(first / "config.json"), "--no-progress"]) == 0
    assert runs.load_config(second).model == runs.load_config(first).model
    bad = tmp_path / "bad.json"
    for text, words in (('{"model": {', "is not valid JSON"), ("[1, 2]", "must hold a JSON object")):
        bad.write_text(text)
        assert main(["train", "--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert main([*train_args(tmp_path / "r", npz), "--set", "train.lr=1", "--set", "train.lr.x=2"]) == 2
    assert "set each key once" in capsys.readouterr().err
    assert main([*train_args(tmp_path / "r", npz), "--set", "data=1"]) == 2
    assert "replace the whole data section" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_run_finds_its_data_from_any_folder_and_defaults_to_the_split_it_has(tmp_path, npz, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(train_args("run", npz.name)) == 0  # a relative --data path
    source = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["source"]
    assert source == str(npz.resolve())
    # a relative path given by --set is made absolute the same way
    assert main([*train_args("run_set", "mnist"), "--set", f"data.source={npz.name}"]) == 0
    assert json.loads((tmp_path / "run_set" / "config.json").read_text())["data"]["source"] == str(npz.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = str(tmp_path / "run")
    assert main(["encode", run]) == 0  # this data has no test split: valid is the default
    assert np.load(tmp_path / "run" / "codes_valid.npz")["z"].shape == (30, 2)
    assert main(["reconstruct", run, "--out", "r.png"]) == 0 and (elsewhere / "r.png").exists()
    assert main(["eval", run, "--k", "5", "--limit", "4", "--no-progress"]) == 0
    assert "valid_eval" in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_run_whose_data_moved_says_so(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    npz.rename(tmp_path / "moved.npz")
    assert main(["reconstruct", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not found from here" in err and "config.json" in err


def test_ctrl_c_in_training_exits_130_and_says_how_to_resume(tmp_path, npz, capsys, monkeypatch):
    import vaekit.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaekit.train, "fit", interrupted)
    assert main(train_args(tmp_path / "run", npz)) == 130
    assert "--resume" in capsys.readouterr().err


def test_data_info_gives_uint8_values_as_stored_and_as_read(npz, capsys):
    assert main(["data", "info", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "uint8, values 0..255, read as [0, 1], labels 3 classes" in out


def test_out_that_already_holds_a_run_is_refused(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    before = (run / "model.safetensors").read_bytes()
    assert main(train_args(run, npz)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before


def test_bernoulli_on_data_outside_unit_range_suggests_gaussian(tmp_path, capsys):
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).normal(0, 3, (100, 5)).astype(np.float32))
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(path), "--no-progress"]) == 2
    assert "--likelihood gaussian" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "g"), "--data", str(path), "--likelihood", "gaussian",
                 "--sigma", "learned", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                 "--batch-size", "20", "--no-progress"]) == 0


def test_usage_error_exits_2(capsys):
    assert main(["train"]) == 2  # --out is required
    assert main(["no-such-command"]) == 2


def test_subprocess_train_and_eval(tmp_path, npz):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vaekit", *train_args(run, npz)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "vaekit", "eval", str(tmp_path / "nope")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_threads_option_sets_torch_threads(tmp_path, npz):
    before = torch.get_num_threads()
    try:
        assert main([*train_args(tmp_path / "r", npz), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_grad_samples_reach_the_run_config_and_need_dreg(tmp_path, npz, capsys):
    run = tmp_path / "run"
    iw = ["--objective", "iwae", "--k", "6", "--dreg", "--binarize", "dynamic"]
    assert main(train_args(run, npz, *iw, "--grad-samples", "2")) == 0
    assert json.loads((run / "config.json").read_text())["train"]["grad_samples"] == 2
    assert main(train_args(tmp_path / "no_dreg", npz, "--objective", "iwae", "--k", "6", "--grad-samples", "2")) != 0
    assert "grad_samples thins the backward pass of the DReG estimator" in capsys.readouterr().err
    assert not (tmp_path / "no_dreg" / "model.safetensors").exists()


@pytest.mark.parametrize("n", [10, 20])
def test_a_tiny_data_set_trains_and_gets_its_report(tmp_path, n):
    # 10 examples leave 1 for validation (no pair to interpolate between), 20 leave 2 (one pair)
    rng = np.random.default_rng(0)
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=(rng.random((n, 8, 8)) < 0.3).astype(np.uint8) * 255)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(tiny), "--latent-dim", "2", "--hidden", "8",
                 "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    assert (run / "report.html").exists() and (run / "reconstructions.png").exists()
    assert (run / "interpolations.png").exists() == (n == 20)


def test_compare_plots_rate_and_distortion_only_for_runs_measured_alike(tmp_path, npz, monkeypatch, capsys):
    from vaekit import plots

    bern, wide, gauss = tmp_path / "bern", tmp_path / "wide", tmp_path / "gauss"
    assert main(train_args(bern, npz)) == 0
    assert main(train_args(wide, npz, "--latent-dim", "3")) == 0
    assert main(train_args(gauss, npz, "--likelihood", "gaussian", "--sigma", "0.1")) == 0
    drawn = []
    real = plots.rate_distortion
    monkeypatch.setattr(plots, "rate_distortion", lambda points: drawn.append(points) or real(points))
    cmp = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", str(bern), str(gauss), str(wide), "--out", str(cmp)]) == 0
    assert capsys.readouterr().out.strip() == str(cmp / "report.html")  # where to look
    ev = {run: json.loads((run / "summary.json").read_text())["valid"] for run in (bern, wide)}
    assert drawn == [[("bern (z=2)", ev[bern]["kl"], ev[bern]["recon"]),
                      ("wide (z=3)", ev[wide]["kl"], ev[wide]["recon"])]]
    page = (cmp / "report.html").read_text()
    assert "are not measured like those of the first run evaluated" in page and "conditional model): gauss." in page
    assert "other data" not in page
    assert "The nats of gauss are not measured like those of bern" in page  # the table's numbers too
    assert "<th>likelihood</th><th>binarization</th>" in page and "<td>gaussian (σ 0.1)</td>" in page
    gauss_page = (gauss / "report.html").read_text()
    assert "The decoder is Gaussian, so log p(x|z) and log p(x) are log densities" in gauss_page
    assert "decoder is Gaussian" not in (bern / "report.html").read_text()

    # no run with a finite ELBO on record: no figure, and an older one in the folder goes
    for run in (bern, wide):
        summary = json.loads((run / "summary.json").read_text())
        summary["valid"]["kl"] = None
        (run / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(bern), str(wide), "--out", str(cmp), "--overwrite"]) == 0
    page = (cmp / "report.html").read_text()
    assert len(drawn) == 1 and not (cmp / "rate_distortion.png").exists() and "rate_distortion" not in page

    # a run trained on other data reconstructs the first run's images all the same, marked so
    copy = tmp_path / "copy.npz"
    copy.write_bytes(npz.read_bytes())
    assert main(train_args(tmp_path / "elsewhere", copy)) == 0
    assert main(["compare", str(bern), str(tmp_path / "elsewhere"), "--out", str(tmp_path / "cmp3")]) == 0
    assert "Marked &#x27;other data&#x27; (elsewhere)" in (tmp_path / "cmp3" / "report.html").read_text()


def test_compare_gives_each_run_the_first_runs_images_with_their_labels(tmp_path, npz, capsys, monkeypatch):
    from vaekit import generate, runs
    from vaekit.data import load_splits

    plain, cond = tmp_path / "plain", tmp_path / "cond"
    assert main(train_args(plain, npz)) == 0
    relabelled = tmp_path / "relabelled.npz"  # the same images in another order, so other labels in each place
    d = np.load(npz)
    np.savez(relabelled, x=d["x"][::-1], y=d["y"][::-1])
    assert main(train_args(cond, relabelled, "--conditional")) == 0
    seen = []
    real = generate.reconstruct
    monkeypatch.setattr(generate, "reconstruct", lambda model, x, y=None: seen.append(y) or real(model, x, y))
    assert main(["compare", str(plain), str(cond), "--n", "6", "--out", str(tmp_path / "cmp")]) == 0
    first_labels = load_splits(runs.load_config(plain).data).valid.y[:6]
    assert seen[0] is None and torch.equal(seen[1], first_labels)

    report = (plain / "report.html").read_bytes()
    assert main(["compare", str(cond), str(plain), "--out", str(plain)]) == 2
    assert "is a run directory" in capsys.readouterr().err and (plain / "report.html").read_bytes() == report
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=d["x"])
    assert main(train_args(tmp_path / "nolabels", unlabelled)) == 0
    capsys.readouterr()
    # the latent figure's caption speaks of labels only where the data has them
    assert "coloured by label" in report.decode()
    assert "coloured by label" not in (tmp_path / "nolabels" / "report.html").read_text()
    assert main(["compare", str(tmp_path / "nolabels"), str(cond), "--out", str(tmp_path / "cmp2")]) == 2
    assert "have no labels. Put a run of labelled data first" in capsys.readouterr().err
    assert not (tmp_path / "cmp2").exists()


def test_the_console_shows_a_user_warning_as_one_plain_line():
    from vaekit.cli import _plain_warning

    assert _plain_warning("--compile failed; training without it.", UserWarning, "train.py", 569,
                          "warnings.warn(...)") == "warning: --compile failed; training without it.\n"
    other = _plain_warning("old", DeprecationWarning, "x.py", 3, "")
    assert "DeprecationWarning" in other and "x.py:3" in other


def test_a_config_file_without_binarize_takes_the_default_of_the_data(tmp_path, npz):
    from vaekit import runs

    given = tmp_path / "c.json"
    given.write_text('{"model": {"latent_dim": 2}}')
    assert main(train_args(tmp_path / "run", npz, "--config", str(given))) == 0
    assert runs.load_config(tmp_path / "run").data.binarize == "none"  # grey data of one's own: as it is


def test_a_colour_model_takes_grey_images_as_their_rgb_copies(tmp_path):
    """A folder whose RGB images are all grey loads as one channel; a model of colour images (one trained on
    such a folder by an older version, which read it as three) takes it as the RGB copies it was trained on."""
    from PIL import Image

    rng = np.random.default_rng(1)

    def folder(name, colour):
        for i in range(40):
            a = rng.integers(0, 256, (6, 6, 3) if colour else (6, 6, 1), dtype=np.uint8)
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(np.broadcast_to(a, (6, 6, 3)).copy()).save(tmp_path / name / f"{i:02}.png")
        return tmp_path / name

    run = tmp_path / "run"
    assert main(train_args(run, folder("photos", colour=True), "--batch-size", "10")) == 0
    grey = folder("grey", colour=False)
    x = np.stack([np.asarray(Image.open(p)) for p in sorted(grey.iterdir())]).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "rgb.npz", x=x)  # the same pixels as three channels
    assert main(["encode", str(run), "--data", str(grey)]) == 0
    assert main(["encode", str(run), "--data", str(tmp_path / "rgb.npz")]) == 0
    np.testing.assert_array_equal(np.load(run / "codes_of_grey.npz")["z"], np.load(run / "codes_of_rgb.npz")["z"])
    # the run's own folder, now of grey images: read as three channels, not "the data has changed"
    for p in (tmp_path / "photos").iterdir():
        p.unlink()
    for p in grey.iterdir():
        p.rename(tmp_path / "photos" / p.name)
    assert main(["encode", str(run), "--split", "valid"]) == 0
