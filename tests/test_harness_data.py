"""The harness's data readers: the CIFAR python batches (tiny files written here in that format)
and image folders load exactly what was written; a pickle naming anything but numpy arrays is
refused without running it; the forms a model asks for (table, grid, tokens) and the synthetic
token task."""
import os
import pickle

import numpy as np
import pytest
import torch

from unlearn_ext.evaluate import data_files, datasets, tokens


def write_cifar(root, which="cifar10", per_file=12, classes=3, seed=0):
    """The python version's layout: pickled dicts with b'data' (uint8 N x 3072) and the labels
    (a list of ints) under b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100)."""
    train, test, key = data_files.CIFAR_FILES[which]
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    written = {}
    for name in train + test:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(per_file) % classes]
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"batch_label": b"tiny", b"data": data, key.encode(): labels}, f, protocol=2)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_batches_load_exactly_what_was_written(tmp_path, which):
    written = write_cifar(tmp_path / which, which)
    train, test, _ = data_files.CIFAR_FILES[which]
    x, y, x_te, y_te, kind = data_files.read_cifar(which, str(tmp_path / which))
    assert kind == "image" and x.shape == (12 * len(train), 3, 32, 32) and x_te.shape == (12 * len(test), 3, 32, 32)
    want_x = np.concatenate([written[n][0] for n in train]).reshape(-1, 3, 32, 32).astype(np.float32)
    assert np.array_equal(x, want_x)
    assert np.array_equal(y, np.concatenate([written[n][1] for n in train]))
    assert np.array_equal(x_te, np.concatenate([written[n][0] for n in test]).reshape(-1, 3, 32, 32))
    ds = datasets.load(f"{which}:{tmp_path / which}", form="grid")
    assert ds.kind == "image" and ds.input_shape == (3, 32, 32) and ds.classes == 3
    channel_means = ds.x.mean(dim=(0, 2, 3))
    assert torch.all(channel_means.abs() < 1e-4)  # standardized per channel with the training statistics


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_cifar_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    write_cifar(tmp_path)
    marker = str(tmp_path / "created-by-the-pickle")
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(datasets.DatasetError, match="data_batch_3: refers to posix.mkdir|data_batch_3: refers to os.mkdir"):
        datasets.load(f"cifar10:{tmp_path}", form="grid")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing data_batch_2"),
    ("shape", "'data' must be uint8 N x 3072"),
    ("labels", "must hold one label per row"),
    ("garbage", "not a readable CIFAR batch"),
])
def test_bad_cifar_folders_are_named(tmp_path, damage, message):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    if damage == "missing":
        path.unlink()
    elif damage == "shape":
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 0]}, f, protocol=2)
    elif damage == "labels":
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    else:
        path.write_bytes(b"\x80\x02 not a pickle")
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.load(f"cifar10:{tmp_path}", form="grid")


def write_image_folder(root, sizes=((8, 8),), modes=("L",), per_class=6, classes=("cat", "dog")):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = []
    for label, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            mode = modes[i % len(modes)]
            pixels = rng.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:03d}.png")
            written.append((pixels, label))
    return written


def test_an_image_folder_loads_its_pixels_and_class_labels(tmp_path):
    written = write_image_folder(tmp_path)
    x, y, x_te, y_te, kind = data_files.read_image_folder(str(tmp_path))
    assert kind == "image" and x_te is None and x.shape == (12, 1, 8, 8)
    assert np.array_equal(x[:, 0], np.stack([p for p, _ in written]).astype(np.float32))
    assert y.tolist() == [label for _, label in written]
    ds = datasets.load(str(tmp_path), form="grid")
    assert ds.classes == 2 and len(ds.y) + len(ds.y_test) == 12 and ds.input_shape == (1, 8, 8)


def test_an_image_folder_with_color_images_reads_rgb(tmp_path):
    write_image_folder(tmp_path, modes=("L", "RGB"))
    x, *_ = data_files.read_image_folder(str(tmp_path))
    assert x.shape == (12, 3, 8, 8)
    assert np.array_equal(x[0, 0], x[0, 1])  # a grayscale image repeated in the three channels


def test_images_of_different_sizes_are_refused(tmp_path):
    write_image_folder(tmp_path, sizes=((8, 8), (9, 8)))
    with pytest.raises(datasets.DatasetError, match="images differ in size"):
        datasets.load(str(tmp_path), form="grid")


def test_digits_as_images_are_the_split_pixels_standardized_per_channel():
    """digits for image models: the same seeded split as the table logreg/mlp read, each sample a
    1x8x8 image standardized with one mean and deviation (its one channel's) from the training split."""
    from sklearn.datasets import load_digits
    table, grid = datasets.load("digits"), datasets.load("digits", form="grid")
    assert grid.x.shape == (len(table.y), 1, 8, 8) and torch.equal(grid.y, table.y)
    raw = load_digits().data.astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(raw))
    train = raw[perm[int(round(0.2 * len(raw))):]]
    want = (train - train.mean()) / train.std()
    assert np.allclose(grid.x.reshape(len(train), -1).numpy(), want, atol=1e-5)


def test_mnist1d_as_signals():
    pytest.importorskip("mnist1d")
    ds = datasets.load("mnist1d", form="grid")
    assert ds.kind == "signal" and ds.x.shape == (4000, 1, 40) and ds.classes == 10


def test_the_token_task_is_seeded_and_learnable_by_its_markers():
    a, b = tokens.generate(200, 3), tokens.generate(200, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(tokens.generate(200, 4)[0], a[0])
    x, y = a
    for row, label in zip(x, y):  # every marker in a sequence belongs to its class
        assert set(row[row < tokens.CLASSES * tokens.MARKERS] // tokens.MARKERS) == {label}
    ds = datasets.load("tokens", form="tokens")
    assert ds.x.dtype == torch.int64 and ds.vocab <= tokens.VOCAB and ds.classes == tokens.CLASSES


@pytest.mark.parametrize("form, message", [
    ("table", "the model reads a table"),
    ("grid", "the model reads images"),
])
def test_tokens_are_refused_by_models_that_read_numbers(form, message):
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.load("tokens", form=form)
