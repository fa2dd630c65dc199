"""Readers of a user's data files for the harness: `.npz` arrays, image folders and the CIFAR-10 /
CIFAR-100 python format. Each returns raw numpy arrays (x_train, y_train, x_test, y_test, kind),
with x_test / y_test None where the files hold no test split; datasets.py checks labels, splits,
standardizes and shapes them for the model. Nothing downloads; nothing loaded can run code."""
from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np


class DataFileError(ValueError):
    """A data file that cannot be used, with what is wrong in the message."""


# ---- .npz ----------------------------------------------------------------------------------------

def read_npz(path: str):
    """x (n x d table, n x T integer tokens, n x C x L signals or n x C x H x W images) and y (n
    integer labels), optionally x_test / y_test."""
    if not os.path.exists(path):
        raise DataFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and suggest loading it unsafely
        raise DataFileError(f"{path}: not an .npz file (not a zip archive); write it with numpy.savez(path, x=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as f:  # never run code from a data file
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile / format errors come in many types
        raise DataFileError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataFileError(f"{path}: missing array {key!r} (found {sorted(arrays)}); expected x (n x d table, "
                                "n x T tokens or n x C x H x W images) and y (n integer labels), optionally x_test "
                                "and y_test")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataFileError(f"{path}: give both x_test and y_test, or neither")
    x = arrays["x"]
    kind = {2: "table", 3: "signal", 4: "image"}.get(x.ndim)
    if kind is None:
        raise DataFileError(f"{path}: x must be n x d (table or tokens), n x C x L (signals) or n x C x H x W "
                            f"(images), got shape {x.shape}")
    return x, arrays["y"], arrays.get("x_test"), arrays.get("y_test"), kind


# ---- image folders -------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image_folder(root: str):
    """root/<class>/<image> (labels: the class folders in sorted order), or root/train/<class>/... and
    root/test/<class>/... for a fixed test split. Every image must have the same size; grayscale
    images give 1 channel, anything else is read as RGB."""
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if subdirs == ["test", "train"]:
        classes = _class_folders(os.path.join(root, "train"))
        test_classes = _class_folders(os.path.join(root, "test"))
        if not set(test_classes) <= set(classes):
            raise DataFileError(f"{root}: test/ has classes not in train/: {sorted(set(test_classes) - set(classes))}")
        x, y = _read_classes(os.path.join(root, "train"), classes)
        x_te, y_te = _read_classes(os.path.join(root, "test"), classes)
        if x_te.shape[1:] != x.shape[1:]:
            raise DataFileError(f"{root}: test images are {x_te.shape[1:]} but training images {x.shape[1:]}")
        return x, y, x_te, y_te, "image"
    x, y = _read_classes(root, _class_folders(root))
    return x, y, None, None, "image"


def _class_folders(root: str) -> list[str]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) < 2:
        raise DataFileError(f"{root}: an image folder needs one subfolder per class (at least 2), found {len(classes)}")
    return classes


def _read_classes(root: str, classes: list[str]):
    from PIL import Image, UnidentifiedImageError

    images, labels, first = [], [], None
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        for f in files:
            path = os.path.join(folder, f)
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append((path, im.mode, np.asarray(im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB"))))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataFileError(f"{path}: not a readable image ({exc})") from None
            labels.append(label)
            if first is None:
                first = images[-1]
            if images[-1][2].shape[:2] != first[2].shape[:2]:
                raise DataFileError(f"images differ in size: {first[0]} is {first[2].shape[1]}x{first[2].shape[0]}, "
                                    f"{path} is {images[-1][2].shape[1]}x{images[-1][2].shape[0]}; resize them to one size")
    if not images:
        raise DataFileError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    color = any(a.ndim == 3 for _, _, a in images)
    arrays = [np.asarray(Image.fromarray(a).convert("RGB")) if color and a.ndim == 2 else a for _, _, a in images]
    x = np.stack(arrays).astype(np.float32)
    x = x.transpose(0, 3, 1, 2) if color else x[:, None]  # N x C x H x W
    return x, np.asarray(labels, dtype=np.int64)


# ---- CIFAR-10 / CIFAR-100, the python version's pickled batches ------------------------------------

CIFAR_FILES = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
               "cifar100": (["train"], ["test"], "fine_labels")}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other class or function named by the
    file is refused, so a tampered file cannot run code when loaded (pickle can call any importable
    function; CIFAR's batches need none but numpy's array reconstruction)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at pickle protocol 2 (a str -> bytes call)

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataFileError(f"refers to {module}.{name}; only plain containers and numpy arrays are loaded")


def read_cifar(which: str, root: str):
    """CIFAR-10 (`data_batch_1..5`, `test_batch`, labels under 'labels') or CIFAR-100 (`train`,
    `test`, 'fine_labels'): each a pickled dict with 'data', uint8 N x 3072 (1024 red, green, blue
    values per image, row-major 32 x 32). Give the folder holding those files."""
    train_files, test_files, label_key = CIFAR_FILES[which]
    if not os.path.isdir(root):
        raise DataFileError(f"{which}:{root}: no such folder (give the folder holding {', '.join(train_files + test_files)})")
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataFileError(f"{which}:{root}: missing {', '.join(missing)} (the python version's batch files; "
                            "nothing is downloaded)")
    x, y = _cifar_batches(root, train_files, label_key)
    x_te, y_te = _cifar_batches(root, test_files, label_key)
    return x, y, x_te, y_te, "image"


def _cifar_batches(root, files, label_key):
    xs, ys = [], []
    for name in files:
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as f:
                batch = _ArraysOnly(f, encoding="bytes").load()
        except DataFileError as exc:
            raise DataFileError(f"{path}: {exc}") from None
        except Exception as exc:  # truncated or not a pickle at all
            raise DataFileError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from None
        if not isinstance(batch, dict):
            raise DataFileError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data, labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataFileError(f"{path}: 'data' must be uint8 N x 3072, got {got}")
        labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
        if labels is None or labels.ndim != 1 or len(labels) != len(data):
            raise DataFileError(f"{path}: {label_key!r} must hold one label per row of 'data' ({len(data)})")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)
