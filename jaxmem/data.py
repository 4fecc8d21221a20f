"""Data sets: the one place that knows TFDS and files.

Every loader returns a :class:`Dataset` whose ``x`` is float32 ``[n, *example_shape]``
(the batch contract of ``docs/CONTRACTS.md``): images are ``[n, height, width,
channels]`` with pixel intensities in [0, 1]; tabular data keep their real values.

Sources:

- ``"digits"`` (the default): scikit-learn's ``load_digits``, 1,797 real 8x8
  handwritten digits with intensities 0..16, shipped inside scikit-learn and so
  available offline. Pixels are ``value / 16``.
- TFDS catalogue data sets, read with ``tfds.data_source`` from prepared
  array_record files (no TensorFlow needed to read, never a download):
  ``mnist``, ``fashion_mnist``, ``binarized_mnist``, ``cifar10``, ``celeb_a``.
- The user's own ``.npy`` (``x`` only), ``.npz`` (keys ``x`` and optional ``y``) or
  ``.csv`` (numeric columns; an optional header, names quoted or not, whose ``y`` or
  ``label`` column holds labels (both is refused as ambiguous); pandas' numbered header
  ``0,1,...`` is a header; a column without a name, such as the row index of pandas'
  ``to_csv()``, is refused) files.

Preprocessing follows van den Burg & Williams (2021):

- 8-bit images are stored as ``k / 255`` for ``k`` in 0..255; a user's uint8 file whose
  values are all 0 or 1 holds binary images and is kept as 0/1 (levels 2), and one whose
  largest value is below 128 is warned of (levels 0..16 saved as bytes would otherwise
  pass as nearly black 8-bit images). ``metadata["levels"]``
  records how many intensity levels the stored values take (``x = k / (levels - 1)``:
  256 for 8-bit images, 17 for the embedded digits, 2 after static binarization, None
  for real-valued data and after ``resize_to`` interpolates the digits or a file's
  images, whose values then lie between levels; TFDS images are resized as 8-bit images
  and keep 256); it describes the data and is not read by the models. The
  convolutional VAE (:mod:`jaxmem.models`) always assumes 8-bit pixels: it dequantizes
  ``(round(255 x) + u) / 256`` with ``u ~ U[0, 1)``, drawn by the model (per-key
  randomness, see CONTRACTS.md), whatever ``levels`` says; ``jaxmem run`` warns when it
  is run on data whose ``levels`` is not 256.
- ``binarize="dynamic"`` keeps the intensities and records that the model must draw
  a fresh Bernoulli sample each time it sees an example; ``binarize="static"`` draws
  one Bernoulli sample per pixel here, from ``seed`` (the same pixels for example
  ``i`` whatever ``limit`` is). ``binarized_mnist`` is already binary (the fixed
  binarization of Larochelle & Murray, 2011).
- ``pad_to=32`` zero-pads 28x28 MNIST-like images by 2 pixels on each side, as the
  paper does; ``None`` leaves them unpadded.
- ``celeb_a`` is center-cropped to 148x148 (from 218x178) and resized with Pillow's
  antialiased bilinear filter to ``resize_to`` x ``resize_to`` (default 64; the
  paper's lower resolution is 32).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem import _warn
from jaxmem.membership import _check_int, _check_seed

__all__ = [
    "Dataset",
    "DatasetNotPreparedError",
    "KNOWN_DATASETS",
    "load_dataset",
    "nearest_neighbours",
    "read_table",
]


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set is not prepared (as array_record files) in the data directory."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set held in host memory.

    Attributes:
      x: float32 ``[n, *example_shape]``; images are ``[n, height, width, channels]``
        with intensities in [0, 1].
      y: int32 ``[n]`` class labels, or None when the data set has none.
      name: a short name (``"mnist"``, ``"digits"``, the file's stem).
      metadata: JSON-serialisable facts about where the data came from and how it
        was preprocessed: ``source``, ``split``, ``preprocessing`` (list of steps),
        ``binarization`` (None, ``"static"``, ``"dynamic"`` or ``"fixed"``),
        ``levels`` (number of quantization levels of the stored intensities, or
        None for real-valued data, also after an interpolating resize) and
        ``num_classes`` (or None).
    """

    x: np.ndarray
    y: np.ndarray | None
    name: str
    metadata: dict[str, Any]

    def __post_init__(self):
        _check_x(self.x, "x")
        if self.x.dtype != np.float32:
            raise ValueError(f"Dataset.x must be float32, got {self.x.dtype}")
        if self.y is not None:
            _check_y(self.y, len(self.x))

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example, ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        """True for ``[height, width, channels]`` examples."""
        return len(self.example_shape) == 3

    def __len__(self) -> int:
        return len(self.x)


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    label: str | None  # feature key of the class label
    num_classes: int | None
    binary: bool  # stored values are already {0, 1}
    crop: int | None = None  # center crop side before resizing
    default_resize: int | None = None


_TFDS: dict[str, _TfdsSpec] = {
    "mnist": _TfdsSpec("label", 10, binary=False),
    "fashion_mnist": _TfdsSpec("label", 10, binary=False),
    "binarized_mnist": _TfdsSpec(None, None, binary=True),
    "cifar10": _TfdsSpec("label", 10, binary=False),
    "celeb_a": _TfdsSpec(None, None, binary=False, crop=148, default_resize=64),
}

KNOWN_DATASETS: tuple[str, ...] = ("digits", *_TFDS)
"""Names :func:`load_dataset` accepts besides file paths."""

_FILE_SUFFIXES = (".npy", ".npz", ".csv")
_READ_CHUNK = 1024  # records decoded per TFDS read: bounds memory for CelebA


def load_dataset(
    name_or_path: str | os.PathLike = "digits",
    *,
    split: str = "train",
    limit: int | None = None,
    binarize: Literal["static", "dynamic"] | None = None,
    pad_to: int | None = None,
    resize_to: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads a named data set or a user's file, validated and preprocessed.

    Args:
      name_or_path: one of :data:`KNOWN_DATASETS` or a path to a ``.npy``, ``.npz``
        or ``.csv`` file.
      split: the TFDS split (``"train"``, ``"test"``, or TFDS slicing such as
        ``"train[:10%]"``). The embedded data set and files have only ``"train"``.
      limit: keep only the first ``limit`` examples (in the source's order).
      binarize: None (keep intensities), ``"static"`` (one Bernoulli draw per pixel
        now, from ``seed``) or ``"dynamic"`` (keep intensities; the model draws).
        Needs values in [0, 1].
      pad_to: zero-pad images symmetrically to ``pad_to`` x ``pad_to`` pixels (the
        paper pads 28x28 MNIST-like images to 32).
      resize_to: resize images to ``resize_to`` x ``resize_to`` pixels (after the
        CelebA crop; default 64 for ``celeb_a``, no resize otherwise). TFDS images are
        resized as 8-bit images (Pillow); the digits and files' images are interpolated
        as floats, so their ``metadata["levels"]`` becomes None.
      seed: seed of static binarization, a non-negative integer.
      data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); a leading ``~`` is expanded to the home directory.

    Returns:
      A :class:`Dataset` with float32 ``x`` ``[n, *example_shape]``.

    Examples:
      >>> d = load_dataset("digits", binarize="static", seed=0)
      >>> d.x.shape, d.metadata["binarization"]
      ((1797, 8, 8, 1), 'static')

    Raises:
      FileNotFoundError: a file does not exist; :class:`DatasetNotPreparedError`
        (a subclass) when a TFDS data set is not prepared locally. The message says
        how to prepare it. Nothing is ever downloaded.
      ValueError: an unknown name, a malformed file (wrong shape, empty, not real
        numbers (e.g. complex), NaN or inf, labels that are not integers in
        ``0..2**31 - 1`` (int32), a CSV with both a ``y`` and a ``label`` column; the first
        offending example's index named) or invalid options (``limit``,
        ``pad_to`` or ``resize_to`` not a positive integer or None, ``seed`` not a
        non-negative integer).
    """
    limit, pad_to, resize_to = (
        _positive_int_or_none(option, value)
        for option, value in (("limit", limit), ("pad_to", pad_to), ("resize_to", resize_to))
    )
    if binarize not in (None, "static", "dynamic"):
        raise ValueError(
            f"binarize must be None, 'static' or 'dynamic', got {binarize!r}"
        )
    seed = _check_seed(seed)
    if data_dir is not None:
        # "~/..." from Python, or `--data-dir=~/...`, which the shell does not expand
        data_dir = os.path.expanduser(os.fspath(data_dir))

    key = os.fspath(name_or_path)
    if key == "digits":
        _only_train(split, "the embedded 'digits' data set")
        x, y, meta = _load_digits()
        name = "digits"
    elif key in _TFDS:
        x, y, meta = _load_tfds(key, split, limit, resize_to, data_dir)
        name = key
    elif key.lower().endswith(_FILE_SUFFIXES) or os.path.exists(os.path.expanduser(key)):
        _only_train(split, "a data file")
        x, y, meta = _load_file(pathlib.Path(key).expanduser())  # "~/x.npy" from Python
        name = pathlib.Path(key).stem
    else:
        raise ValueError(
            f"unknown data set {key!r}: use one of {', '.join(KNOWN_DATASETS)}, "
            f"or a path to a {', '.join(_FILE_SUFFIXES)} file"
        )

    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
    if resize_to is not None and key not in _TFDS:  # TFDS resizes while reading
        x = _resize(x, resize_to, meta)
    if pad_to is not None:
        x = _pad(x, pad_to, meta)
    x = _binarize(x, binarize, seed, meta, already_binary=meta["binarization"] == "fixed")
    return Dataset(x=np.ascontiguousarray(x, dtype=np.float32), y=y, name=name, metadata=meta)


def _positive_int_or_none(name: str, value: Any) -> int | None:
    """``value`` as an int >= 1, or None; refuses floats (even whole ones) and bools."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _only_train(split: str, what: str) -> None:
    if split != "train":
        raise ValueError(f"{what} has a single split, 'train'; got split={split!r}")


def _meta(source: str, split: str, levels: int | None, num_classes: int | None) -> dict:
    return {
        "source": source,
        "split": split,
        "preprocessing": [],
        "binarization": None,
        "levels": levels,
        "num_classes": num_classes,
    }


# --------------------------------------------------------------------------- digits


def _load_digits():
    from sklearn.datasets import load_digits  # noqa: PLC0415  (heavy import, only here)

    bunch = load_digits()
    # Intensities are integers 0..16 (17 levels): / 16 puts them in [0, 1].
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    meta = _meta("sklearn.datasets.load_digits", "train", levels=17, num_classes=10)
    meta["preprocessing"].append("intensities 0..16 divided by 16")
    return x, y, meta


# ----------------------------------------------------------------------------- TFDS


def _prepare_hint(name: str, data_dir) -> str:
    where = os.fspath(data_dir) if data_dir is not None else _default_tfds_dir()
    return (
        f"TFDS data set {name!r} is not prepared in {where}. jaxmem reads prepared "
        "array_record files with tfds.data_source and never downloads. Prepare it once "
        "on a machine with internet access and TensorFlow: "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR`, copy DIR here "
        "if needed, then pass data_dir=DIR (`--data-dir DIR` to the jaxmem command; or set "
        "TFDS_DATA_DIR=DIR)."
    )


def _default_tfds_dir() -> str:
    from tensorflow_datasets.core import constants  # noqa: PLC0415

    return os.fspath(constants.DATA_DIR)


@contextlib.contextmanager
def _tfds_empty_temp_dirs_removed():
    """Remove the empty ``tmp*tfds`` folders that TFDS leaves in the temp dir during the block.

    Building a data set's info without its files (``DatasetInfo.initialize_from_bucket``,
    TFDS 4.9) makes a temporary folder for metadata from GCS before it asks GCS, and
    leaves it behind, empty, when GCS has nothing or cannot be reached: one per call
    on an unprepared data set. Only folders that appeared during the block and are
    still empty are removed (``os.rmdir`` refuses any other).
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _load_tfds(name, split, limit, resize_to, data_dir):
    with _tfds_empty_temp_dirs_removed():
        return _load_tfds_records(name, split, limit, resize_to, data_dir)


def _load_tfds_records(name, split, limit, resize_to, data_dir):
    import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import, only when used)

    spec = _TFDS[name]
    try:
        # download=False: an offline download_and_prepare retries for minutes.
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:
        # TFDS reports a missing data set in several ways (DatasetNotFoundError,
        # NotImplementedError about the TFRecord default format...); decide by
        # looking at the files rather than by parsing its messages.
        if not _tfds_prepared(name, data_dir):
            raise DatasetNotPreparedError(_prepare_hint(name, data_dir)) from None
        raise ValueError(
            f"TFDS could not open split {split!r} of {name!r} "
            f"(prepared it with --file_format=array_record?): {err}"
        ) from err

    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise ValueError(f"TFDS split {split!r} of {name!r} is empty")
    size = resize_to if resize_to is not None else spec.default_resize

    images, labels = [], []
    for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(n, start + _READ_CHUNK)))
        # One record at a time: decoding dominates the cost, and the batched
        # __getitems__ of TFDS 4.9.10's mock_data is broken.
        records = [source[k] for k in keys]
        chunk = np.stack([np.asarray(r["image"]) for r in records])
        if spec.crop is not None:
            chunk = _center_crop(chunk, spec.crop)
        if size is not None:
            chunk = _resize_uint8(chunk, size)
        images.append(chunk)
        if spec.label is not None:
            labels.extend(int(r[spec.label]) for r in records)
    raw = np.concatenate(images)

    meta = _meta(f"tfds:{name}", split, levels=2 if spec.binary else 256,
                 num_classes=spec.num_classes)
    if spec.binary:
        if raw.max() > 1:
            raise ValueError(f"{name!r} should hold binary pixels, found value {raw.max()}")
        x = raw.astype(np.float32)
        meta["binarization"] = "fixed"
        meta["preprocessing"].append("fixed binarization of Larochelle & Murray (2011)")
    else:
        x = raw.astype(np.float32) / 255.0
        meta["preprocessing"].append("8-bit intensities divided by 255")
    if spec.crop is not None:
        meta["preprocessing"].append(f"center crop to {spec.crop}x{spec.crop}")
    if size is not None:
        meta["preprocessing"].append(f"resize to {size}x{size} (Pillow, bilinear, antialiased)")
    y = np.asarray(labels, dtype=np.int32) if spec.label is not None else None
    return x, y, meta


def _tfds_prepared(name: str, data_dir) -> bool:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # noqa: BLE001  (no builder at all means not prepared)
        return False


def _center_crop(images: np.ndarray, side: int) -> np.ndarray:
    h, w = images.shape[1:3]
    if side > h or side > w:
        raise ValueError(f"cannot center-crop {h}x{w} images to {side}x{side}")
    top, left = (h - side) // 2, (w - side) // 2
    return images[:, top : top + side, left : left + side]


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    if images.shape[1:3] == (size, size):
        return images
    out = []
    for img in images:
        squeeze = img.shape[-1] == 1
        pil = Image.fromarray(img[..., 0] if squeeze else img)
        arr = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
        out.append(arr[..., None] if squeeze else arr)
    return np.stack(out)


# ---------------------------------------------------------------------- user files


def _existing_file(path: pathlib.Path, what: str, kinds: str) -> None:
    """Refuse a missing path or a directory, naming what was expected."""
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a {kinds} file")


def _load_file(path: pathlib.Path):
    _existing_file(path, "data", ".npy, .npz or .csv")
    suffix = path.suffix.lower()
    y = None
    if suffix == ".npy":
        x = _np_load(path)
    elif suffix == ".npz":
        with _np_load(path) as archive:
            if "x" not in archive.files:
                raise ValueError(
                    f"{path} has no array named 'x' (found: {', '.join(archive.files) or 'none'}); "
                    "save it with np.savez(path, x=x) or np.savez(path, x=x, y=y)"
                )
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    elif suffix == ".csv":
        x, y = _read_csv(path)
    else:
        raise ValueError(f"unsupported file type {path.suffix!r}: use .npy, .npz or .csv")

    _check_real(x, f"{path}: x", bool_ok=True)
    _check_x(x, f"{path}: x")
    meta = _meta(f"file:{path.resolve()}", "train", levels=None, num_classes=None)
    top = int(x.max()) if x.dtype == np.uint8 else None  # x is not empty (_check_x)
    if top is not None and top <= 1:
        # 0/1 bytes are binary images (how binarized MNIST is usually saved), not 8-bit
        # intensities: divided by 255 they would be near-black {0, 1/255}.
        x = x.astype(np.float32)
        meta["levels"] = 2
        meta["preprocessing"].append("uint8 0/1 values read as binary pixels")
    elif top is not None:
        # 8-bit pixels: scaled like the TFDS images so models see [0, 1].
        if top < 128:
            _warn.warn(
                f"{path}: x is uint8 with a largest value of {top}, read as 8-bit intensities k/255 (so its "
                f"brightest pixel becomes {top / 255:.3g}); if its values are levels 0..{top} (e.g. the 17 of "
                f"8x8 digits), save x / {top} as float32 instead", UserWarning)
        x = x.astype(np.float32) / 255.0
        meta["levels"] = 256
        meta["preprocessing"].append("8-bit intensities divided by 255")
    else:
        x = x.astype(np.float32)
        _check_x(x, f"{path}: x (as float32)")  # float64 values beyond float32's range
    if y is not None:
        y = _check_y(y, len(x), where=f"{path}: y")
        meta["num_classes"] = int(y.max()) + 1
    return x, y, meta


def _np_load(path: pathlib.Path):
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise ValueError(f"{path}: cannot read as a numeric array ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a valid {path.suffix} file ({err})") from None


def _read_csv(path: pathlib.Path):
    table, names, _ = read_table(path)
    y = None
    label_cols = [i for i, c in enumerate(names) if c.lower() in ("y", "label")]
    if len(label_cols) > 1:
        # the other would silently stay a feature (a copy of the labels, or other labels)
        found = ", ".join(f"{names[i]!r} (column {i})" for i in label_cols)
        raise ValueError(f"{path}: {len(label_cols)} columns can hold the labels: {found}; keep one "
                         "named 'y' or 'label' (rename or drop the others)")
    if label_cols:
        col = label_cols[0]
        y = table[:, col]
        table = np.delete(table, col, axis=1)
    return table, y


def read_table(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """A numeric table from a ``.csv`` (optional header), ``.npz`` (``x`` and optional ``y``) or ``.npy`` file.

    A CSV's first line is a header when any of its cells is not a number, or when it is
    ``0,1,...,d-1`` (``,0,1,...`` with a row index): the column names that pandas'
    ``to_csv()`` writes for a numpy matrix, read back as names ``"0", "1", ...``, as
    pandas reads them. Cells may be quoted (``"a","b","label"``, as R's ``write.csv``
    writes names, or quoted numbers): the quotes are removed.

    Returns:
      ``(table, columns, y)``: float64 ``[rows, columns]``; the column names (from the CSV
      header, unquoted, else ``"column j"``); the ``.npz`` file's ``y`` array or None. Values
      are not checked for NaN here (callers name the offending cell in their own terms).

    Raises:
      FileNotFoundError: no such file. ValueError: a directory, another suffix, a table
      that is not 2-D, not real numbers (complex, strings...; also an ``.npz`` ``y``) or has
      no rows, a header whose length differs from the rows', a header with an empty name
      (the row index that pandas' ``to_csv()`` and R's ``write.csv`` write by default:
      refused rather than used as a feature), a first row ``0`` or ``0,1`` above integer
      rows (pandas' column names or data: name the columns).
    """
    path = pathlib.Path(path).expanduser()
    _existing_file(path, "table", ".csv, .npz or .npy")
    suffix = path.suffix.lower()
    y = None
    if suffix == ".csv":
        # utf-8-sig: Excel's "CSV UTF-8" and pandas' encoding="utf-8-sig" start with a byte
        # order mark, which made the first cell no number (a data row read as the header).
        with open(path, encoding="utf-8-sig") as f:
            first, second = f.readline(), f.readline()
        if not first.strip():
            raise ValueError(f"{path} is empty (no rows)")
        # csv.reader unquotes cells as R's write.csv quotes them ("a","b","label").
        cells = [c.strip() for c in next(csv.reader([first]))]
        # A first row of numbers with empty cells is data with missing values (loadtxt names
        # them), not a header of nameless columns; pandas' numbered column names are a header.
        has_header = (not all(_is_number(c) for c in cells if c)
                      or _pandas_numbered_header(path, cells, second))
        if has_header and "" in cells:
            j = cells.index("")
            raise ValueError(
                f"{path}: column {j} of the header has no name; pandas' to_csv() writes its row "
                "index this way (R's write.csv its row names): save with index=False (R: "
                "row.names=FALSE), or name the column"
            )
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=int(has_header), ndmin=2, dtype=np.float64,
                               quotechar='"', encoding="utf-8-sig")
        except ValueError as err:
            raise ValueError(f"{path}: not a numeric CSV table ({err})") from None
        names = cells if has_header else [f"column {j}" for j in range(table.shape[1])]
    elif suffix in (".npz", ".npy"):
        loaded = _np_load(path)
        if suffix == ".npz":
            with loaded as z:
                if "x" not in z.files:
                    raise ValueError(f"{path} has no array named 'x' (found: {', '.join(z.files) or 'none'})")
                table = z["x"]
                y = z["y"] if "y" in z.files else None
        else:
            table = loaded
        if table.ndim != 2:
            raise ValueError(f"{path}: the table must be 2-D [rows, columns], got shape {table.shape}")
        _check_real(table, f"{path}: the table")
        if y is not None:
            _check_real(y, f"{path}: y", bool_ok=True)
        table = table.astype(np.float64)
        names = [f"column {j}" for j in range(table.shape[1])]
    else:
        raise ValueError(f"unsupported table type {path.suffix!r}: use .csv, .npz or .npy")
    if table.size == 0:
        raise ValueError(f"{path} has no data rows")
    if table.shape[1] != len(names):
        raise ValueError(f"{path}: the header has {len(names)} names but rows have {table.shape[1]} values")
    return table, names, y


def _check_real(a: np.ndarray, what: str, *, bool_ok: bool = False) -> None:
    """Refuse arrays that are not real numbers: complex (``astype`` would silently drop the
    imaginary part), strings, datetimes, objects; booleans only with ``bool_ok``."""
    if a.dtype.kind == "c":
        raise ValueError(f"{what} is complex (dtype {a.dtype}); only real numbers are supported: "
                         "save the real part (np.real), the magnitude (np.abs), or the real and "
                         "imaginary parts as separate features")
    if not (a.dtype.kind in "iuf" or (bool_ok and a.dtype.kind == "b")):
        raise ValueError(f"{what} must be numeric (real numbers), got dtype {a.dtype}")


def _pandas_numbered_header(path: pathlib.Path, cells: list[str], second: str) -> bool:
    """Whether a CSV's first row ``cells`` is the header pandas' ``to_csv()`` writes for a
    numpy matrix: its column names ``0, 1, ..., d-1``, after an empty cell for the row index
    unless ``index=False``. With one or two columns and integers in the next row (``second``),
    where ``0`` or ``0,1`` is as likely a data row, it is refused rather than guessed."""
    index = bool(cells) and cells[0] == ""
    names = cells[int(index):]
    if not names or names != [str(j) for j in range(len(names))]:
        return False
    below = [c.strip() for c in next(csv.reader([second]), [])]
    if index or len(names) > 2 or not all(re.fullmatch(r"[+-]?\d+", c) for c in below):
        return True
    raise ValueError(
        f"{path}: the first row {','.join(cells)!r} is either a data row or the column names "
        "pandas' to_csv() gives a numpy matrix; add a header row of column names (pandas: "
        "pd.DataFrame(x, columns=[...]).to_csv(path, index=False))"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- validation


def _check_x(x: np.ndarray, what: str) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{what} must have shape [examples, *example_shape] (at least 2-D), got shape "
            f"{x.shape}; reshape scalar examples to (n, 1)"
        )
    if x.shape[0] == 0 or x[0].size == 0:
        raise ValueError(f"{what} is empty: shape {x.shape}")
    _check_finite(x, what)


def _check_finite(x: np.ndarray, what: str) -> None:
    """Refuse NaN or inf in ``x`` ``[n, ...]``, naming the first bad example and position."""
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            first = int(bad[0])
            pos = np.argwhere(~np.isfinite(x[first]))[0]
            kind = "NaN" if np.isnan(x[first][tuple(pos)]) else "inf"
            raise ValueError(
                f"{what} contains NaN or inf in {len(bad)} example(s); the first is "
                f"example {first} ({kind} at position {tuple(int(p) for p in pos)})"
            )


def _check_y(y: np.ndarray, n: int, where: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{where} must have shape [{n}] (one label per example), got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        finite = np.isfinite(y)
        if not finite.all():
            raise ValueError(f"{where} contains NaN or inf; the first is example "
                             f"{int(np.flatnonzero(~finite)[0])}")
        if not np.array_equal(y, np.round(y)):
            first = int(np.flatnonzero(y != np.round(y))[0])
            raise ValueError(f"{where} must hold integer class labels; example {first} "
                             f"has {y[first]}")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where} must hold integer class labels, got dtype {y.dtype}")
    if (y < 0).any():
        raise ValueError(f"{where} must be non-negative; example {int(np.argmax(y < 0))} is "
                         f"{y[np.argmax(y < 0)]}")
    # Labels are stored as int32: a larger one would wrap to another class (2**32 + 1 -> 1).
    # Compared in float64 / int64: float32(2**31 - 1) is 2**31, so 2**31 passed and wrapped.
    top = np.iinfo(np.int32).max
    wide = y.astype(np.float64) if np.issubdtype(y.dtype, np.floating) else y
    over = np.flatnonzero(wide > top)
    if over.size:
        first = int(over[0])
        raise ValueError(f"{where} must hold class labels 0..{top} (int32); example {first} is "
                         f"{y[first]}: number the classes 0, 1, ... (e.g. np.unique(y, "
                         "return_inverse=True)[1])")
    return y.astype(np.int32)


# ------------------------------------------------------------------- preprocessing


def _image_axes(x: np.ndarray, op: str) -> None:
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{op} needs images [n, height, width(, channels)], got shape {x.shape}"
        )


def _pad(x: np.ndarray, size: int, meta: dict) -> np.ndarray:
    _image_axes(x, "pad_to")
    h, w = x.shape[1:3]
    if size < h or size < w:
        raise ValueError(f"pad_to={size} is smaller than the {h}x{w} images")
    top, left = (size - h) // 2, (size - w) // 2
    widths = [(0, 0), (top, size - h - top), (left, size - w - left)]
    widths += [(0, 0)] * (x.ndim - 3)
    meta["preprocessing"].append(f"zero-pad {h}x{w} to {size}x{size}")
    return np.pad(x, widths)


def _resize(x: np.ndarray, size: int, meta: dict) -> np.ndarray:
    _image_axes(x, "resize_to")
    if x.shape[1:3] == (size, size):
        return x
    # Antialiased linear resampling in [0, 1] floats (Pillow needs uint8 sources).
    shape = (len(x), size, size, *x.shape[3:])
    out = np.asarray(jax.image.resize(jnp.asarray(x), shape, "linear", antialias=True))
    meta["preprocessing"].append(f"resize to {size}x{size} (linear, antialiased)")
    out = np.clip(out, 0.0, 1.0) if meta.get("levels") else out
    meta["levels"] = None  # interpolated values lie between the source's levels
    return out


def _binarize(x, mode, seed, meta, *, already_binary: bool) -> np.ndarray:
    if mode is None:
        return x
    if already_binary:
        # Bernoulli draws of {0, 1} pixels are the pixels themselves.
        return x
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"binarize={mode!r} needs intensities in [0, 1], the data span [{lo}, {hi}]"
        )
    meta["binarization"] = mode
    meta["levels"] = 2 if mode == "static" else meta["levels"]
    if mode == "dynamic":
        meta["preprocessing"].append("dynamic binarization (drawn by the model)")
        return x
    # One draw per pixel in C order: example i gets the same pixels whatever `limit`.
    u = np.random.default_rng(seed).random(x.shape, dtype=np.float32)
    meta["preprocessing"].append(f"static binarization (Bernoulli, seed {seed})")
    return (u < x).astype(np.float32)


# ------------------------------------------------------------- nearest neighbours


_NN_BLOCK_BYTES = 1 << 26  # float64 pool rows converted at a time (64 MiB)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of matching rows of ``a`` and ``b`` (``[r, d]`` -> float64
    ``[r]``), from the differences: exact for integer-valued data (8-bit pixels), so exact
    ties stay ties."""
    diff = a.astype(np.float64) - b
    return np.einsum("ij,ij->i", diff, diff)


def _nn_chunk(queries, pool, mean, exclude, k):
    """The ``k`` nearest pool rows of each query row (float32 ``[m, d]``): int ``[m, k]``
    indices and float64 ``[m, k]`` squared distances from the differences, nearest first,
    ties to the lower index.

    Candidates come from ``||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2`` of the data centred on
    the pool's ``mean``, in float64 (one matmul per block of pool rows; float32 cancelled
    for data far from 0): the ``k + max(k, 32)`` lowest. They are ranked by distances from
    the differences, ties by index (the expansion's rounding orders exact ties at random).
    A query for which a row outside its candidates could still tie with or beat its k-th
    neighbour (the expansion's error bound, about ``2e-15 * d`` of the centred squared
    norms, reaches past the last candidate: many near-ties) gets distances from the
    differences to the whole pool instead.
    """
    m, n = len(queries), len(pool)
    d = pool.shape[1]
    q = queries.astype(np.float64) - mean
    q_sq = np.einsum("ij,ij->i", q, q)
    width = min(n, k + max(k, 32))
    best_d = np.full((m, 0), np.inf)
    best_i = np.zeros((m, 0), np.int64)
    # Pool rows per block: the block's float64 rows [block, d] and its distances to the
    # chunk's queries [m, block] (with the candidates' distances and indices beside them)
    # are at most 64 MiB each, whatever d and m are (a table of 8 columns took 1.6 GB).
    block = max(1, _NN_BLOCK_BYTES // (8 * max(1, d, m)))
    rows = np.arange(m)
    p_sq_max = 0.0
    for start in range(0, n, block):
        stop = min(n, start + block)
        p = pool[start:stop].astype(np.float64) - mean
        p_sq = np.einsum("ij,ij->i", p, p)
        p_sq_max = max(p_sq_max, float(p_sq.max()))
        d2 = q_sq[:, None] - 2.0 * (q @ p.T) + p_sq[None, :]
        inside = (exclude >= start) & (exclude < stop)
        d2[rows[inside], exclude[inside] - start] = np.inf
        cand_d = np.concatenate([best_d, d2], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, stop), d2.shape)], axis=1)
        if width < cand_d.shape[1]:
            part = np.argpartition(cand_d, width - 1, axis=1)[:, :width]
            cand_d, cand_i = np.take_along_axis(cand_d, part, 1), np.take_along_axis(cand_i, part, 1)
        best_d, best_i = cand_d, cand_i
    # every row left out has an expansion >= the largest kept one, best_d.max(1)
    exact = np.stack([_sq_dist(pool[best_i[:, j]], queries) for j in range(width)], axis=1)
    exact[best_i == exclude[:, None]] = np.inf
    order = np.lexsort((best_i, exact), axis=1)[:, :k]  # by distance, then index
    idx, dist = np.take_along_axis(best_i, order, 1), np.take_along_axis(exact, order, 1)
    if width < n:
        # Rounding of the expansion and of both exact sums: a generous multiple of the
        # textbook bound (d + 2) * eps * (|q|^2 + |p|^2) for the centred vectors.
        tol = 8.0 * (d + 8) * np.finfo(np.float64).eps * (q_sq + p_sq_max)
        for i in np.flatnonzero(best_d.max(axis=1) - tol <= dist[:, -1]):
            idx[i], dist[i] = _nn_brute_force(queries[i], pool, int(exclude[i]), k, block)
    return idx, dist


def _nn_brute_force(query, pool, exclude, k, block):
    """The ``k`` nearest pool rows of one query ``[d]`` by distances from the differences to
    every pool row (``block`` rows at a time), ties to the lower index."""
    d2 = np.concatenate([_sq_dist(pool[s:s + block], query[None, :]) for s in range(0, len(pool), block)])
    if exclude >= 0:
        d2[exclude] = np.inf
    near = np.flatnonzero(d2 <= np.partition(d2, k - 1)[k - 1])  # ascending index, ties kept
    top = near[np.lexsort((near, d2[near]))[:k]]
    return top, d2[top]


def nearest_neighbours(
    queries: np.ndarray,
    pool: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest pool examples of every query, by Euclidean distance in pixels.

    Every query gets its own distances to the whole pool (no row of a batch stands in
    for the others). Queries are processed ``chunk_size`` at a time and the pool in
    blocks of rows sized so that each float64 array of a block (its rows, and its
    distances to the chunk's queries) is at most 64 MiB: memory beside the data is a
    few such arrays (about 0.3 GiB), the chunk's queries in float64 (``8 * chunk_size *
    d`` bytes, a few times over), and one byte per value of the pool for its finiteness
    check, whatever the number of pool rows.

    Args:
      queries: ``[q, *example_shape]``, finite; ``q`` may be 0.
      pool: ``[n, *example_shape]``, the candidates (e.g. the training set), finite,
        ``n >= 1``.
      k: neighbours per query, an integer ``1 <= k <= n`` (``n - 1`` with ``exclude``).
      exclude: optional integer ``[q]``: the pool index in ``[0, n)`` to skip for each
        query (its own position when the queries are pool members), or ``-1`` to skip
        nothing for that query.
      chunk_size: queries processed at a time, a positive integer.

    Returns:
      ``(indices, distances)``: int32 ``[q, k]`` pool indices, nearest first, and
      float32 ``[q, k]`` Euclidean distances in the data's units (empty ``[0, k]``
      arrays for no queries), computed from the differences. Candidates are found by
      ``||q||^2 - 2 q.p + ||p||^2`` of the data centred on the pool's mean in float64 on
      the host (a matmul per block of pool rows), wherever the data lie (8-bit pixels,
      unscaled table columns), and ranked by the distances from the differences (exact
      for integer-valued data); ties (equal distances) go to the lower pool index, as a
      stable sort of the exact distances orders them. A query with more ties or
      near-ties (within the expansion's rounding) at its ``k``-th neighbour than the
      ``k + max(k, 32)`` candidates hold is ranked over the whole pool by distances
      from the differences instead (slower, same result).

    Raises:
      ValueError: queries and pool that differ in example shape, an empty pool, NaN
        or inf in either (naming the first such example), ``k`` or ``chunk_size``
        not a positive integer or ``k`` larger than the candidates, an ``exclude``
        that is not an integer ``[q]`` array (a bool mask is refused) or holds an
        index outside ``[-1, n)`` (the first is named).

    Examples:
      >>> pool = np.eye(3, dtype=np.float32)
      >>> idx, dist = nearest_neighbours(pool, pool, k=1, exclude=np.arange(3))
      >>> idx.ravel().tolist(), [round(float(v), 3) for v in dist.ravel()]
      ([1, 0, 0], [1.414, 1.414, 1.414])
    """
    queries = np.asarray(queries, dtype=np.float32)
    pool = np.asarray(pool, dtype=np.float32)
    if queries.ndim < 1 or pool.ndim < 1 or queries.shape[1:] != pool.shape[1:]:
        raise ValueError(f"queries {queries.shape} and pool {pool.shape} differ in example shape")
    q, n = len(queries), len(pool)
    if n == 0:
        raise ValueError(f"pool is empty: shape {pool.shape}")
    k = _check_int("k", k, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    available = n - (exclude is not None)
    if k > available:
        raise ValueError(f"k must be in [1, {available}] for a pool of {n}, got {k}")
    _check_finite(pool, "pool")
    if q:
        _check_finite(queries, "queries")
    if exclude is None:
        exclude = np.full(q, -1, dtype=np.int32)
    exclude = np.asarray(exclude)
    if not np.issubdtype(exclude.dtype, np.integer):
        raise ValueError(
            f"exclude must be integer pool indices [q] (-1 for none), got dtype {exclude.dtype}"
            + (" (a bool mask is not accepted: give each query's own pool index)"
               if exclude.dtype == np.bool_ else "")
        )
    if exclude.shape != (q,):
        raise ValueError(f"exclude must have shape [{q}], got {exclude.shape}")
    bad = np.flatnonzero((exclude < -1) | (exclude >= n))
    if bad.size:
        raise ValueError(
            f"exclude must hold pool indices in [0, {n}) or -1 (none); query {int(bad[0])} "
            f"has {exclude[bad[0]]} ({bad.size} out of range)"
        )
    exclude = exclude.astype(np.int32)
    if q == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    flat_q = queries.reshape(q, -1)
    flat_p = pool.reshape(n, -1)
    mean = flat_p.mean(axis=0, dtype=np.float64)
    indices, dists = [], []
    for start in range(0, q, chunk_size):
        stop = min(q, start + chunk_size)
        idx, d2 = _nn_chunk(flat_q[start:stop], flat_p, mean, exclude[start:stop], k)
        indices.append(idx)
        dists.append(np.sqrt(d2).astype(np.float32))
    return np.concatenate(indices).astype(np.int32), np.concatenate(dists)
