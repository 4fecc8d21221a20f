"""Tests of jaxmem.data: the embedded digits, TFDS (mocked), user files, neighbours."""

import tempfile
import time
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxmem.data import (
    KNOWN_DATASETS,
    Dataset,
    DatasetNotPreparedError,
    load_dataset,
    nearest_neighbours,
    read_table,
)

# ------------------------------------------------------------------ embedded digits


def test_digits_shape_range_labels_and_determinism():
    from sklearn.datasets import load_digits

    d = load_dataset()
    assert d.name == "digits"
    assert d.x.shape == (1797, 8, 8, 1) and d.x.dtype == np.float32
    assert d.example_shape == (8, 8, 1) and d.is_image and len(d) == 1797
    assert d.x.min() == 0.0 and d.x.max() == 1.0
    # Intensities are exactly k/16: multiplying back gives integers 0..16.
    np.testing.assert_array_equal(d.x[..., 0] * 16, load_digits().images)
    assert d.y.dtype == np.int32 and set(np.unique(d.y)) == set(range(10))
    assert d.metadata["levels"] == 17 and d.metadata["num_classes"] == 10
    again = load_dataset("digits")
    np.testing.assert_array_equal(d.x, again.x)


def test_static_binarization_is_seeded_and_independent_of_limit():
    full = load_dataset("digits", binarize="static", seed=3)
    assert set(np.unique(full.x)) == {0.0, 1.0}
    assert full.metadata["binarization"] == "static" and full.metadata["levels"] == 2
    part = load_dataset("digits", binarize="static", seed=3, limit=50)
    np.testing.assert_array_equal(part.x, full.x[:50])
    other = load_dataset("digits", binarize="static", seed=4, limit=50)
    assert not np.array_equal(other.x, part.x)
    # Bernoulli(p): over all pixels the mean of the draws matches the mean intensity
    # (1797*64 draws, std of the mean <= 0.5/sqrt(115008) = 0.0015: 0.01 is > 6 sd).
    grey = load_dataset("digits")
    assert abs(full.x.mean() - grey.x.mean()) < 0.01
    # Pixels at 0 or 1 are never flipped.
    np.testing.assert_array_equal(full.x[grey.x == 0.0], 0.0)
    np.testing.assert_array_equal(full.x[grey.x == 1.0], 1.0)


def test_dynamic_binarization_keeps_intensities_and_padding():
    d = load_dataset("digits", binarize="dynamic", pad_to=12, limit=4)
    assert d.x.shape == (4, 12, 12, 1) and d.metadata["binarization"] == "dynamic"
    grey = load_dataset("digits", limit=4)
    np.testing.assert_array_equal(d.x[:, 2:10, 2:10], grey.x)
    assert d.x[:, :2].sum() == 0 and d.x[:, 10:].sum() == 0


def test_levels_after_an_interpolating_resize(tmp_path):
    """resize_to interpolates the digits and files' images as floats: metadata["levels"] said
    17 or 256 although the values are off that grid (jaxmem run's conv_vae warning reads it)."""
    digits = load_dataset("digits", limit=5, resize_to=16)
    k = digits.x * 16
    assert digits.x.shape == (5, 16, 16, 1) and not np.allclose(k, np.round(k), atol=1e-5)
    assert digits.metadata["levels"] is None
    assert load_dataset("digits", limit=5, resize_to=8).metadata["levels"] == 17  # no resize
    np.save(tmp_path / "bytes.npy", np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), np.uint8))
    assert load_dataset(tmp_path / "bytes.npy", resize_to=14).metadata["levels"] is None
    with tfds.testing.mock_data(num_examples=2):  # Pillow resizes the bytes: still 8-bit
        mnist = load_dataset("mnist", resize_to=14)
    assert mnist.metadata["levels"] == 256
    # k / 255 in float32 times 255 is k to within float32 rounding (~1e-5 at k = 255)
    np.testing.assert_allclose(mnist.x * 255, np.round(mnist.x * 255), atol=1e-4)


def test_uint8_files_of_binary_or_few_levels(tmp_path):
    """uint8 0/1 images (how binarized MNIST is usually saved) were divided by 255 into
    near-black {0, 1/255}: dynamic binarization then saw 0.08 'on' pixels per image
    instead of ~19, and jaxmem run finished without a word. Read as binary now; a uint8
    file whose largest value is far below 255 (levels 0..16 saved as bytes) is warned of."""
    binary = np.random.default_rng(0).integers(0, 2, (3, 28, 28, 1), np.uint8)
    np.save(tmp_path / "binary.npy", binary)
    d = load_dataset(tmp_path / "binary.npy")
    np.testing.assert_array_equal(d.x, binary.astype(np.float32))
    assert d.metadata["levels"] == 2
    np.save(tmp_path / "levels16.npy", (binary * 16).astype(np.uint8))
    with pytest.warns(UserWarning, match=r"largest value of 16, read as 8-bit intensities k/255 .* save x / 16"):
        d = load_dataset(tmp_path / "levels16.npy")
    np.testing.assert_allclose(d.x, binary * 16 / 255.0, rtol=1e-6)  # still read as documented
    np.save(tmp_path / "bytes.npy", np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 8-bit images reaching 255: no warning
        assert load_dataset(tmp_path / "bytes.npy").metadata["levels"] == 256


def test_bad_options():
    with pytest.raises(ValueError, match="binarize must be None, 'static' or 'dynamic'"):
        load_dataset("digits", binarize="yes")
    with pytest.raises(ValueError, match="pad_to=4 is smaller than the 8x8 images"):
        load_dataset("digits", pad_to=4)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_dataset("digits", limit=0)
    with pytest.raises(ValueError, match="single split, 'train'"):
        load_dataset("digits", split="test")
    with pytest.raises(ValueError, match=r"limit must be a positive integer or None, got 5\.0"):
        load_dataset("digits", limit=5.0)
    with pytest.raises(ValueError, match=r"pad_to must be a positive integer or None, got 12\.0"):
        load_dataset("digits", pad_to=12.0)
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError, match=rf"seed must be a non-negative integer, got {seed}"):
            load_dataset("digits", limit=2, seed=seed)
    assert len(load_dataset("digits", limit=np.int64(3))) == 3  # numpy integers are integers


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("mnits")
    for name in KNOWN_DATASETS:
        assert name in str(err.value)
    assert ".npz" in str(err.value)


# ---------------------------------------------------------------------------- TFDS


def test_tfds_mnist_mock_padding_and_static_binarization():
    with tfds.testing.mock_data(num_examples=6):
        grey = load_dataset("mnist", pad_to=32)
        binary = load_dataset("mnist", pad_to=32, binarize="static", seed=1)
        raw = tfds.data_source("mnist", split="train")
        pixels = np.stack([raw[i]["image"] for i in range(6)])
        labels = np.array([raw[i]["label"] for i in range(6)])
    assert grey.x.shape == (6, 32, 32, 1) and grey.x.dtype == np.float32
    assert grey.metadata["source"] == "tfds:mnist" and grey.metadata["levels"] == 256
    # Pad 2 on each side; the interior is exactly the stored bytes / 255.
    np.testing.assert_array_equal(grey.x[:, 2:30, 2:30] * 255, pixels.astype(np.float32))
    assert grey.x[:, :2].max() == 0 and grey.x[:, 30:].max() == 0
    assert grey.x[:, :, :2].max() == 0 and grey.x[:, :, 30:].max() == 0
    np.testing.assert_array_equal(grey.y, labels)
    assert set(np.unique(binary.x)) <= {0.0, 1.0}
    np.testing.assert_array_equal(binary.x[grey.x == 0], 0.0)
    assert binary.metadata["binarization"] == "static"


def test_tfds_cifar10_and_celeb_a_shapes():
    with tfds.testing.mock_data(num_examples=3):
        cifar = load_dataset("cifar10", split="test", limit=2)
        celeb = load_dataset("celeb_a", resize_to=32)
    assert cifar.x.shape == (2, 32, 32, 3) and cifar.y.shape == (2,)
    assert 0.0 <= cifar.x.min() and cifar.x.max() <= 1.0
    assert celeb.x.shape == (3, 32, 32, 3) and celeb.y is None
    assert "center crop to 148x148" in celeb.metadata["preprocessing"]


def test_tfds_binarized_mnist_keeps_fixed_binarization():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 2, size=(4, 28, 28, 1), dtype=np.uint8)
    # mock_data's random images ignore max_value, so serve real binary pixels.
    with tfds.testing.mock_data(
        as_data_source_fn=lambda *a, **k: [{"image": im} for im in images]
    ):
        d = load_dataset("binarized_mnist", binarize="static", pad_to=32)
    assert d.metadata["binarization"] == "fixed" and d.y is None
    np.testing.assert_array_equal(d.x[:, 2:30, 2:30], images.astype(np.float32))


def test_tfds_not_prepared_gives_instructions_without_download(tmp_path, monkeypatch):
    # TFDS leaves an empty tmp*tfds folder in the temp dir for an unprepared data set;
    # jaxmem removes it (a temp dir of this test's own, so other processes do not count)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tfds.builder("fashion_mnist", data_dir=data_dir)  # TFDS alone: 4.9.10 leaves one such folder
    leaked = list(temp.iterdir())
    assert all(p.name.endswith("tfds") and not any(p.iterdir()) for p in leaked), leaked
    for p in leaked:
        p.rmdir()
    start = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError) as err:
        load_dataset("fashion_mnist", data_dir=data_dir)
    elapsed = time.perf_counter() - start
    assert not any(temp.iterdir())
    # A download attempt offline retries for minutes; reading metadata takes < 1 s.
    assert elapsed < 5.0
    msg = str(err.value)
    assert "not prepared" in msg and str(data_dir) in msg
    assert "tfds build fashion_mnist --file_format=array_record" in msg
    assert isinstance(err.value, FileNotFoundError)
    assert not any(data_dir.iterdir())  # nothing downloaded or written


def test_tfds_data_dir_expands_home(tmp_path, monkeypatch):
    """data_dir="~/..." (and `--data-dir=~/...`, which bash leaves unexpanded after '=') was
    passed to TFDS as it was: a prepared data set reported as not prepared."""
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    images = np.zeros((3, 28, 28, 1), np.uint8)

    def data_source(name, *, split, data_dir, download):
        seen.append(data_dir)
        return [{"image": im, "label": 4} for im in images]

    monkeypatch.setattr(tfds, "data_source", data_source)
    d = load_dataset("mnist", data_dir="~/tensorflow_datasets")
    assert seen == [str(tmp_path / "tensorflow_datasets")] and d.y.tolist() == [4, 4, 4]


# ---------------------------------------------------------------------- user files


def test_npz_and_npy_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).astype(np.float64)
    y = rng.integers(0, 4, size=20)
    np.savez(tmp_path / "table.npz", x=x, y=y)
    d = load_dataset(tmp_path / "table.npz")
    assert d.name == "table" and d.x.dtype == np.float32 and d.x.shape == (20, 3)
    np.testing.assert_allclose(d.x, x, rtol=1e-7)  # float32 rounding of float64
    np.testing.assert_array_equal(d.y, y)
    assert d.metadata["num_classes"] == int(y.max()) + 1

    pixels = rng.integers(0, 256, size=(5, 6, 6, 1), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", pixels)
    d = load_dataset(str(tmp_path / "imgs.npy"), pad_to=8)
    assert d.y is None and d.x.shape == (5, 8, 8, 1) and d.metadata["levels"] == 256
    np.testing.assert_array_equal(np.round(d.x[:, 1:7, 1:7] * 255), pixels)


def test_csv_with_header_label_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,label,b\n1.5,0,2\n-1,1,3.25\n4,1,0\n")
    d = load_dataset(path)
    np.testing.assert_array_equal(d.x, [[1.5, 2], [-1, 3.25], [4, 0]])
    np.testing.assert_array_equal(d.y, [0, 1, 1])
    plain = tmp_path / "p.csv"
    plain.write_text("1,2\n3,4\n")
    d = load_dataset(plain)
    assert d.y is None and d.x.shape == (2, 2)


def test_csv_headers_as_r_and_pandas_write_them(tmp_path):
    # R's write.csv(df, row.names=FALSE) quotes the names (and character cells, not numbers).
    r_style = tmp_path / "r.csv"
    r_style.write_text('"a","label","b"\n1.5,0,2\n-1,1,"3.25"\n4,1,0\n')
    d = load_dataset(r_style)
    np.testing.assert_array_equal(d.x, [[1.5, 2], [-1, 3.25], [4, 0]])
    np.testing.assert_array_equal(d.y, [0, 1, 1])
    assert read_table(r_style)[1] == ["a", "label", "b"]
    # pandas' to_csv() (index=True) and R's write.csv (row.names=TRUE) write the row index as a
    # first column with an empty name: refused, never used as a feature.
    for name, text in [("pandas.csv", ",a,label\n0,1.5,0\n1,-1,1\n2,4,1\n"),
                       ("r_rownames.csv", '"","a","label"\n"1",1.5,0\n"2",-1,1\n"3",4,1\n')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=r"column 0 of the header has no name; pandas' to_csv\(\) "
                                             r"writes its row index this way .* index=False"):
            load_dataset(tmp_path / name)
    # A first row of numbers with a missing cell is data, not a header of nameless columns.
    (tmp_path / "gap.csv").write_text("1,,2\n3,4,5\n")
    with pytest.raises(ValueError, match="not a numeric CSV table"):
        read_table(tmp_path / "gap.csv")


def test_csv_of_a_numpy_matrix_as_pandas_writes_it(tmp_path):
    """pd.DataFrame(x).to_csv(path, index=False) names the columns 0, 1, ...: that header was
    read as an extra example [0, 1, 2]; with the row index (",0,1,2") loadtxt's "could not
    convert string ''" came instead of the message naming pandas' index."""
    x = np.array([[0.5, 1.0, 2.25], [3.0, 4.0, 5.0]])
    for name, text, names in [("floats.csv", "0,1,2\n0.5,1.0,2.25\n3.0,4.0,5.0\n", ["0", "1", "2"]),
                              ("ints.csv", "0,1,2\n0,1,2\n3,4,5\n", ["0", "1", "2"]),  # data of ints
                              ("two.csv", "0,1\n0.5,1.0\n3.0,4.0\n", ["0", "1"])]:
        (tmp_path / name).write_text(text)
        table, columns, _ = read_table(tmp_path / name)
        assert columns == names and table.shape == (2, len(names))
        np.testing.assert_array_equal(load_dataset(tmp_path / name).x, table.astype(np.float32))
    np.testing.assert_array_equal(read_table(tmp_path / "floats.csv")[0], x)
    (tmp_path / "index.csv").write_text(",0,1,2\n0,0.5,1.0,2.25\n1,3.0,4.0,5.0\n")
    with pytest.raises(ValueError, match=r"column 0 of the header has no name; pandas' to_csv\(\) "
                                         r"writes its row index this way .* index=False"):
        load_dataset(tmp_path / "index.csv")
    # "0,1" above integer rows is as likely data: refused, not guessed
    (tmp_path / "pairs.csv").write_text("0,1\n1,0\n1,1\n")
    with pytest.raises(ValueError, match=r"pairs.csv: the first row '0,1' is either a data row or "
                                         r"the column names pandas' to_csv\(\) gives"):
        read_table(tmp_path / "pairs.csv")
    # other numbers stay data
    (tmp_path / "data.csv").write_text("0,2,1\n3,4,5\n")
    assert read_table(tmp_path / "data.csv")[0].tolist() == [[0, 2, 1], [3, 4, 5]]


def test_csv_with_both_y_and_label_columns_is_refused(tmp_path):
    """The 'y' column was taken as the labels and 'label' silently kept as a feature."""
    (tmp_path / "both.csv").write_text("a,y,label\n1.5,0,1\n-1,1,0\n")
    with pytest.raises(ValueError, match=r"both.csv: 2 columns can hold the labels: 'y' \(column 1\), "
                                         r"'label' \(column 2\); keep one"):
        load_dataset(tmp_path / "both.csv")
    assert read_table(tmp_path / "both.csv")[1] == ["a", "y", "label"]  # the leverage command's --target


def test_labels_beyond_int32_are_refused_with_their_value(tmp_path):
    """Labels are int32: 2**32 + 1 became class 1 silently, 2**31 was refused as -2147483648."""
    x = np.zeros((4, 3), np.float32)
    for y, value in [(np.array([0, 1, 2**32 + 1, 5]), "4294967297"),
                     (np.array([0, 1, 2, 2**31]), "2147483648"),
                     (np.array([0.0, 1e10, 2.0, 3.0]), "10000000000.0")]:
        np.savez(tmp_path / "big.npz", x=x, y=y)
        with pytest.raises(ValueError, match=rf"y must hold class labels 0..2147483647 \(int32\); example "
                                             rf"{np.argmax(y > 2**31 - 1)} is {value}: number the classes"):
            load_dataset(tmp_path / "big.npz")
    np.savez(tmp_path / "top.npz", x=x, y=np.array([0, 1, 2, 2**31 - 1]))
    assert load_dataset(tmp_path / "top.npz").y.tolist() == [0, 1, 2, 2**31 - 1]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "data file not found"),
        (lambda p: np.save(p, np.arange(5.0)), r"at least 2-D\), got shape \(5,\)"),
        (lambda p: np.save(p, np.zeros((0, 3))), r"empty: shape \(0, 3\)"),
        (lambda p: np.save(p, np.zeros((4, 0))), r"empty: shape \(4, 0\)"),
        (
            lambda p: np.save(p, np.where(np.arange(12).reshape(4, 3) == 7, np.nan, 1.0)),
            r"NaN or inf in 1 example\(s\); the first is example 2 \(NaN at position \(1,\)\)",
        ),
        (
            lambda p: np.save(p, np.where(np.arange(12).reshape(6, 2) >= 9, np.inf, 1.0)),
            r"2 example\(s\); the first is example 4 \(inf at position \(1,\)\)",
        ),
        (lambda p: np.save(p, np.array([["a", "b"]])), "x must be numeric"),
        # complex: astype(float32) would silently drop the imaginary part
        (lambda p: np.save(p, np.ones((3, 2), np.complex64)), r"bad.npy: x is complex \(dtype complex64\)"),
        (lambda p: p.write_text("not numpy"), "not a valid .npy file|cannot read"),
    ],
)
def test_bad_npy_files(tmp_path, make, match):
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_dataset(path)


def test_bad_npz_and_labels(tmp_path):
    np.savez(tmp_path / "nox.npz", data=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"no array named 'x' \(found: data\)"):
        load_dataset(tmp_path / "nox.npz")
    np.savez(tmp_path / "ylen.npz", x=np.zeros((3, 2)), y=np.zeros(4, int))
    with pytest.raises(ValueError, match=r"y must have shape \[3\]"):
        load_dataset(tmp_path / "ylen.npz")
    np.savez(tmp_path / "yfrac.npz", x=np.zeros((3, 2)), y=np.array([0, 1.5, 2]))
    with pytest.raises(ValueError, match="integer class labels; example 1"):
        load_dataset(tmp_path / "yfrac.npz")
    np.savez(tmp_path / "xcomplex.npz", x=np.ones((3, 2)) + 1j)
    with pytest.raises(ValueError, match=r"xcomplex.npz: x is complex \(dtype complex128\)"):
        load_dataset(tmp_path / "xcomplex.npz")
    # read_table (the leverage command's loader): complex tables and .npz y are refused too
    np.save(tmp_path / "tab.npy", np.ones((5, 2)) + 1j)
    with pytest.raises(ValueError, match=r"tab.npy: the table is complex \(dtype complex128\)"):
        read_table(tmp_path / "tab.npy")
    np.savez(tmp_path / "tab.npz", x=np.ones((5, 2)), y=np.arange(5) * 1j)
    with pytest.raises(ValueError, match=r"tab.npz: y is complex"):
        read_table(tmp_path / "tab.npz")
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    with pytest.raises(ValueError, match="not a numeric CSV"):
        load_dataset(tmp_path / "bad.csv")
    np.save(tmp_path / "real.npy", np.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match=r"needs intensities in \[0, 1\]"):
        load_dataset(tmp_path / "real.npy", binarize="static")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "a.txt").write_text("1")
        load_dataset(tmp_path / "a.txt")


def test_dataset_validates_itself():
    with pytest.raises(ValueError, match="must be float32"):
        Dataset(x=np.zeros((2, 2)), y=None, name="a", metadata={})
    with pytest.raises(ValueError, match=r"y must have shape \[2\]"):
        Dataset(x=np.zeros((2, 2), np.float32), y=np.zeros(3, int), name="a", metadata={})


# ------------------------------------------------------------------ nearest neighbours


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    pool = rng.random((300, 4, 4, 1)).astype(np.float32)
    queries = rng.random((37, 4, 4, 1)).astype(np.float32)
    idx, dist = nearest_neighbours(queries, pool, k=5, chunk_size=16)  # 3 chunks, padded
    d = np.linalg.norm(
        queries.reshape(37, 1, -1).astype(np.float64) - pool.reshape(1, 300, -1), axis=2
    )
    expected = np.argsort(d, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, expected)
    # distances from float32 differences: ~1e-7 relative; 1e-5 leaves ample margin
    np.testing.assert_allclose(dist, np.take_along_axis(d, expected, 1), rtol=1e-5)


def test_nearest_neighbours_of_data_far_from_zero():
    """8-bit pixels and table rows near 1e4: the expanded |q|^2 - 2q.p + |p|^2 alone cancelled
    (distances 38-40 for a true 3.16; five queries all given row 0 at distance 0)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(200, 32 * 32 * 3)).astype(np.float32)
    queries = pixels[:5].copy()
    for j in range(5):
        queries[j, rng.choice(queries.shape[1], 10, replace=False)] += 1  # 10 pixels one level up
    rows = (1e4 + rng.normal(size=(50, 4))).astype(np.float32)
    # two groups far from the mean in opposite directions (an unscaled column): centring
    # alone left the float32 expansion finding the true neighbour for 23% of rows
    groups = rng.normal(size=(60, 4)).astype(np.float32)
    groups[:, 0] += np.where(np.arange(60) < 30, 1e4, -1e4).astype(np.float32)
    for pool, q, true in ((pixels, queries, np.sqrt(10)), (rows, rows[:5] + np.float32(0.01), None),
                          (groups, groups[:5] + np.float32(0.01), None)):
        idx, dist = nearest_neighbours(q, pool, k=2)
        d = np.linalg.norm(q.reshape(5, 1, -1).astype(np.float64) - pool.reshape(1, len(pool), -1), axis=2)
        np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :2])
        assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]
        # float32 differences of values ~1e4 are exact to ~1e-3 absolute (eps * 1e4), ~1e-6
        # relative on the pixel distances: tolerances to match
        np.testing.assert_allclose(dist, np.take_along_axis(d, idx, 1), rtol=1e-5, atol=2e-3)
        if true is not None:
            np.testing.assert_allclose(dist[:, 0], true, rtol=1e-6)


def test_nearest_neighbours_over_blocks_of_the_pool(monkeypatch):
    """The pool is read in blocks (here 7 rows of 16 values each, 43 blocks): the k best are
    kept across blocks, ``exclude`` lands in the right block, ties go to the lower index."""
    from jaxmem import data as data_module

    monkeypatch.setattr(data_module, "_NN_BLOCK_BYTES", 7 * 16 * 8)
    rng = np.random.default_rng(1)
    pool = rng.random((300, 16)).astype(np.float32)
    pool[150] = pool[10]  # a tie: the lower index first
    idx, dist = nearest_neighbours(pool[:40], pool, k=4, exclude=np.arange(40), chunk_size=16)
    d = np.linalg.norm(pool[:40, None, :].astype(np.float64) - pool[None], axis=2)
    d[np.arange(40), np.arange(40)] = np.inf
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :4])
    assert idx[10, 0] == 150 and dist[10, 0] == 0.0  # its duplicate (itself excluded)
    np.testing.assert_allclose(dist, np.take_along_axis(d, idx, 1), rtol=1e-6)


def test_nearest_neighbours_exact_ties_go_to_the_lower_index(monkeypatch):
    """Integer pixels tie exactly; the float64 expansion's rounding ordered the ties at random
    (for a query with ten rows at squared distance 1, rows 207, 220, 265, ... instead of the
    lowest 9, 143, 167, ...). More tied rows than the k + 32 candidates: the whole pool."""
    from jaxmem import data as data_module

    calls = []
    whole_pool = data_module._nn_brute_force
    monkeypatch.setattr(data_module, "_nn_brute_force", lambda *a: calls.append(a[2]) or whole_pool(*a))
    rng = np.random.default_rng(0)
    few = rng.integers(0, 3, (300, 5)).astype(np.float32)  # ~10 rows at each small distance
    many = rng.integers(0, 2, (400, 4)).astype(np.float32)  # 16 patterns, ~25 copies of each
    for pool, k, whole in ((few, 7, False), (many, 30, True)):
        calls.clear()
        q = pool[:20]
        idx, dist = nearest_neighbours(q, pool, k, exclude=np.arange(20), chunk_size=8)
        # exact squared distances (small integers) and a stable sort: ties by index
        d2 = ((q[:, None, :].astype(np.float64) - pool[None]) ** 2).sum(-1)
        d2[np.arange(20), np.arange(20)] = np.inf
        ref = np.argsort(d2, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_array_equal(dist, np.sqrt(np.take_along_axis(d2, ref, 1)).astype(np.float32))
        assert bool(calls) == whole and len(set(calls)) == len(calls)  # each query at most once


def test_nearest_neighbours_exclude_self():
    rng = np.random.default_rng(1)
    pool = rng.random((50, 6)).astype(np.float32)
    idx, dist = nearest_neighbours(pool[:10], pool, k=3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))  # itself, at distance 0
    assert np.all(dist[:, 0] < 1e-3)
    idx, _ = nearest_neighbours(pool[:10], pool, k=3, exclude=np.arange(10))
    assert not np.any(idx == np.arange(10)[:, None])
    d = np.linalg.norm(pool[:10, None].astype(np.float64) - pool[None], axis=2)
    d[np.arange(10), np.arange(10)] = np.inf
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :3])
    with pytest.raises(ValueError, match="k must be in"):
        nearest_neighbours(pool[:2], pool, k=50, exclude=np.arange(2))


def test_truncated_npz_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32))
    path.write_bytes(path.read_bytes()[:40])  # a zip archive cut short
    with pytest.raises(ValueError, match=r"x\.npz: not a valid \.npz file"):
        load_dataset(path)


def test_nearest_neighbours_bad_inputs_are_named():
    rng = np.random.default_rng(2)
    pool = rng.random((20, 3)).astype(np.float32)
    queries = pool[:10]
    # exclude: indices outside [-1, n) and bool masks would exclude nothing silently
    for exclude, match in [
        (np.arange(10) + 100, r"exclude must hold pool indices in \[0, 20\) or -1 \(none\); query 0 has 100"),
        (np.full(10, -5), r"query 0 has -5 \(10 out of range\)"),
        (np.ones(10, bool), "got dtype bool"),
        (np.arange(10.0), "got dtype float64"),
    ]:
        with pytest.raises(ValueError, match=match):
            nearest_neighbours(queries, pool, 2, exclude=exclude)
    idx, _ = nearest_neighbours(queries, pool, 1, exclude=np.full(10, -1))  # -1: skip nothing
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))
    # NaN rows would silently drop out of every neighbour list
    bad = pool.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"pool contains NaN or inf in 1 example\(s\); the first is example 7"):
        nearest_neighbours(queries, bad, 2)
    with pytest.raises(ValueError, match=r"queries contains NaN or inf .* example 7"):
        nearest_neighbours(bad, pool, 2)
    for kwargs, match in [
        ({"k": 2.0}, "k must be an integer >= 1, got 2.0"),
        ({"k": 2.5}, "k must be an integer >= 1, got 2.5"),
        ({"k": 0}, "k must be an integer >= 1, got 0"),
        ({"k": 2, "chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
        ({"k": 2, "chunk_size": -1}, "chunk_size must be an integer >= 1, got -1"),
    ]:
        with pytest.raises(ValueError, match=match):
            nearest_neighbours(queries, pool, **kwargs)
    with pytest.raises(ValueError, match=r"pool is empty"):
        nearest_neighbours(queries, pool[:0], 1)
    # no queries: empty [0, k] results, not a reshape error
    idx, dist = nearest_neighbours(pool[:0], pool, 3)
    assert idx.shape == dist.shape == (0, 3) and idx.dtype == np.int32 and dist.dtype == np.float32


def test_nearest_neighbours_memory_is_bounded_for_narrow_tables(monkeypatch):
    """The pool was read in blocks of 64 MiB of rows, so a chunk's [chunk_size, block]
    distance matrices grew with chunk_size / d: 1.6 GB beside a 6 MiB table of 8 columns.
    Blocks now bound those matrices too. Measured with tracemalloc (numpy reports its
    allocations to it) at a 1 MiB budget: the old blocks' matrices alone took ~40 MB."""
    import tracemalloc

    from jaxmem import data

    monkeypatch.setattr(data, "_NN_BLOCK_BYTES", 1 << 20)
    pool = np.random.default_rng(0).normal(size=(20_000, 4)).astype(np.float32)
    tracemalloc.start()
    try:
        idx, dist = nearest_neighbours(pool[:256], pool, 3, exclude=np.arange(256), chunk_size=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a few 1 MiB arrays per block, plus the pool's float64 copy-free centring: far below 40 MB
    assert peak < 12 << 20, peak
    d2 = ((pool[:256, None, :].astype(np.float64) - pool[None, :, :]) ** 2).sum(-1)
    d2[np.arange(256), np.arange(256)] = np.inf
    ref = np.argsort(d2, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(idx, ref)
    # float32 distances from the float64 exact ones: rounding only
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, ref, 1)), rtol=1e-6)


def test_csv_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" (and pandas' encoding="utf-8-sig") starts with a byte order mark:
    the first cell was no number, so a headerless file lost its first data row to the
    'header' (every index shifted by one), and a header's first name carried the mark."""
    from jaxmem.data import read_table

    rows = np.arange(12, dtype=np.float64).reshape(4, 3) / 4
    body = "\n".join(",".join(f"{v:g}" for v in r) for r in rows) + "\n"
    (tmp_path / "plain.csv").write_text(body, encoding="utf-8-sig")
    (tmp_path / "named.csv").write_text("y,a,b\n" + body, encoding="utf-8-sig")
    table, names, _ = read_table(tmp_path / "plain.csv")
    np.testing.assert_array_equal(table, rows)
    assert names == ["column 0", "column 1", "column 2"]
    table, names, _ = read_table(tmp_path / "named.csv")
    np.testing.assert_array_equal(table, rows)
    assert names == ["y", "a", "b"]


def test_float32_label_of_two_to_the_31_is_refused_with_its_value(tmp_path):
    """float32(2**31 - 1) is 2**31, so the int32 check let 2**31 through, and the cast
    wrapped it: the message then named -2147483648, a value not in the file."""
    y = np.zeros(4, np.float32)
    y[2] = 2.0**31
    np.savez(tmp_path / "d.npz", x=np.full((4, 2, 2), 0.5, np.float32), y=y)
    with pytest.raises(ValueError, match=r"example 2 is 2147483648"):
        load_dataset(tmp_path / "d.npz")
