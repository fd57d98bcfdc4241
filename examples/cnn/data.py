"""Datasets for the CNN example: sklearn digits (bundled), CIFAR-10 (local folder), synthetic.

Every loader returns a :class:`Dataset` of NumPy arrays: images are float32 NHWC, standardized
with the training set's per-channel mean and standard deviation; labels are int32. Nothing
here starts JAX (no computation), so ``main.py`` can still choose the number of devices.

:func:`batches` yields fixed-size batches. The last partial batch is padded up to the batch size
(:func:`jaxbn.parallel.pad_batch`) and comes with a boolean ``mask``, so no example is dropped,
every step has the same shape (one compile), and masked batch normalization keeps the
statistics exact.
"""

from __future__ import annotations

import os
import pickle
from typing import Iterator, NamedTuple, Optional

import numpy as np
from jaxbn.parallel import pad_batch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


class Dataset(NamedTuple):
  """A train/test split held in memory.

  Attributes:
    name: dataset name, e.g. ``"digits"``.
    x_train: float32 (N, H, W, C) training images.
    y_train: int32 (N,) training labels.
    x_test: float32 (M, H, W, C) test images.
    y_test: int32 (M,) test labels.
    num_classes: number of classes.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


class Batch(NamedTuple):
  """One batch: ``image`` (B, H, W, C) float32, ``label`` (B,) int32, ``mask`` (B,) bool."""

  image: np.ndarray
  label: np.ndarray
  mask: np.ndarray


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean = x_train.mean(axis=(0, 1, 2), keepdims=True, dtype=np.float64)
  std = x_train.std(axis=(0, 1, 2), keepdims=True, dtype=np.float64) + 1e-6
  f = lambda x: ((x - mean) / std).astype(np.float32)
  return f(x_train), f(x_test)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's bundled handwritten digits: 1797 8x8 grayscale images, 10 classes.

  The split is stratified and fixed by ``seed``: with the default 0.2, 1437 train / 360 test.
  """
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split

  d = sk_load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  x_train, x_test = _standardize(x_train, x_test)
  return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def _cifar_folder(data_dir: Optional[str]) -> str:
  hint = (f"download {CIFAR10_URL}, extract it (tar xzf cifar-10-python.tar.gz) and pass "
          f"--data_dir path/to/{CIFAR10_FOLDER}")
  if not data_dir:
    raise FileNotFoundError(f"cifar10: no dataset path given; {hint}.")
  path = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"cifar10: --data_dir {path} does not exist; {hint}.")
  if not os.path.exists(os.path.join(path, "test_batch")):
    nested = os.path.join(path, CIFAR10_FOLDER)
    if os.path.exists(os.path.join(nested, "test_batch")):
      return nested
    raise FileNotFoundError(
        f"cifar10: {path} has no `test_batch` file, so it is not the CIFAR-10 \"python version\" "
        f"folder ({CIFAR10_FOLDER}/ with data_batch_1..5 and test_batch); {hint}.")
  return path


def read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one pickled CIFAR-10 batch file.

  The file holds a dict with ``b'data'``, a uint8 (N, 3072) array whose rows are one image in
  channel-major order (1024 red, 1024 green, 1024 blue values, each row-major 32x32), and
  ``b'labels'``, a list of N ints in [0, 9].

  Returns:
    ``(images, labels)``: uint8 (N, 32, 32, 3) NHWC and int32 (N,).
  """
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  try:
    data, labels = d[b"data"], d[b"labels"]
  except (KeyError, TypeError) as e:
    raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch (a dict with b'data' and "
                     f"b'labels'), got keys {list(d)[:5] if isinstance(d, dict) else type(d)}."
                     ) from e
  data = np.asarray(data, dtype=np.uint8)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ValueError(f"cifar10: {path}: b'data' has shape {data.shape}, expected (N, 3072).")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, np.asarray(labels, dtype=np.int32)


def load_cifar10(data_dir: Optional[str], num_train: Optional[int] = None,
                 num_test: Optional[int] = None) -> Dataset:
  """CIFAR-10 from a local "python version" folder (``cifar-10-batches-py``).

  Args:
    data_dir: the ``cifar-10-batches-py`` folder, or a folder that contains it.
    num_train: keep only the first ``num_train`` training images (None: all 50000).
    num_test: keep only the first ``num_test`` test images (None: all 10000).

  Raises:
    FileNotFoundError: the folder is missing or is not in the expected format; the message says
      where to download the dataset.
  """
  path = _cifar_folder(data_dir)
  train_files = sorted(f for f in os.listdir(path) if f.startswith("data_batch_"))
  if not train_files:
    raise FileNotFoundError(f"cifar10: {path} has no data_batch_* files.")
  parts = [read_cifar10_batch(os.path.join(path, f)) for f in train_files]
  x_train = np.concatenate([p[0] for p in parts])[:num_train]
  y_train = np.concatenate([p[1] for p in parts])[:num_train]
  x_test, y_test = read_cifar10_batch(os.path.join(path, "test_batch"))
  x_test, y_test = x_test[:num_test], y_test[:num_test]
  x_train, x_test = _standardize(x_train.astype(np.float32) / 255.0,
                                 x_test.astype(np.float32) / 255.0)
  return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def load_synthetic(num_train: int = 512, num_test: int = 128, image_size: int = 8,
                   channels: int = 1, num_classes: int = 10, noise: float = 1.0,
                   seed: int = 0) -> Dataset:
  """Random class templates plus Gaussian noise: learnable, instant, any image size."""
  rng = np.random.default_rng(seed)
  templates = rng.normal(size=(num_classes, image_size, image_size, channels))

  def make(n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = templates[y] + noise * rng.normal(size=(n, image_size, image_size, channels))
    return x.astype(np.float32), y

  (x_train, y_train), (x_test, y_test) = make(num_train), make(num_test)
  x_train, x_test = _standardize(x_train, x_test)
  return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


DATASETS = ("digits", "cifar10", "synthetic")


def load(name: str, data_dir: Optional[str] = None, *, num_train: Optional[int] = None,
         num_test: Optional[int] = None, noise: float = 0.0, seed: int = 0) -> Dataset:
  """Loads a dataset by name (one of :data:`DATASETS`).

  Args:
    name: ``digits``, ``cifar10`` or ``synthetic``.
    data_dir: the CIFAR-10 folder.
    num_train: keep only the first ``num_train`` training examples.
    num_test: keep only the first ``num_test`` test examples.
    noise: add Gaussian noise of this standard deviation to every standardized image (train
      and test; drawn once from ``seed``, so every epoch sees the same noisy images).
    seed: the split (digits), the synthetic templates and the noise.
  """
  if name == "digits":
    ds = load_digits(seed=seed)
    if num_train or num_test:
      ds = ds._replace(x_train=ds.x_train[:num_train], y_train=ds.y_train[:num_train],
                       x_test=ds.x_test[:num_test], y_test=ds.y_test[:num_test])
  elif name == "cifar10":
    ds = load_cifar10(data_dir, num_train, num_test)
  elif name == "synthetic":
    ds = load_synthetic(num_train or 512, num_test or 128, seed=seed)
  else:
    raise ValueError(f"data.load: unknown dataset {name!r}; choose one of "
                     f"{', '.join(DATASETS)}.")
  if noise:
    rng = np.random.default_rng([seed, 7])
    noisy = lambda x: (x + noise * rng.standard_normal(x.shape)).astype(np.float32)
    ds = ds._replace(x_train=noisy(ds.x_train), x_test=noisy(ds.x_test))
  return ds


def num_batches(n: int, batch_size: int) -> int:
  """Batches per pass over ``n`` examples, counting the padded last one."""
  return -(-n // batch_size)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int,
            rng: Optional[np.random.Generator] = None) -> Iterator[Batch]:
  """Yields batches of exactly ``batch_size`` examples covering all of ``x`` once.

  With ``rng`` the examples are shuffled first. The last batch is padded with zeros and its
  ``mask`` marks the real examples, so every example is seen exactly once per pass.
  """
  n = len(x)
  order = rng.permutation(n) if rng is not None else np.arange(n)
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    (image, label), mask = pad_batch((x[idx], y[idx]), batch_size)
    yield Batch(image, label, mask)


def num_class_sorted_batches(n: int, batch_size: int, devices: int) -> int:
  """Batches per pass of :func:`class_sorted_batches`."""
  return -(-(-(-n // devices)) // (batch_size // devices))


def class_sorted_batches(x: np.ndarray, y: np.ndarray, batch_size: int, devices: int,
                         rng: np.random.Generator) -> Iterator[Batch]:
  """Non-i.i.d. batches: device ``d``'s share always comes from the ``d``-th class-sorted part.

  The training set is sorted by label (ties in random order) and split into ``devices``
  contiguous parts, so each part holds a few classes (2 or 3 of 10 on 8 devices). Every batch
  is the concatenation, in device order, of ``batch_size // devices`` examples of each part —
  what :func:`jaxbn.parallel.shard_batch` splits back onto the devices. Each example is seen
  once per pass; a part that runs out pads its share (mask False).
  """
  per_device = batch_size // devices
  order = np.lexsort((rng.random(len(y)), y))
  parts = [rng.permutation(p) for p in np.array_split(order, devices)]
  for step in range(num_class_sorted_batches(len(y), batch_size, devices)):
    images, labels, masks = [], [], []
    for part in parts:
      idx = part[step * per_device:(step + 1) * per_device]
      (image, label), mask = pad_batch((x[idx], y[idx]), per_device)
      images.append(image)
      labels.append(label)
      masks.append(mask)
    yield Batch(np.concatenate(images), np.concatenate(labels), np.concatenate(masks))


def random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
  """Data augmentation: shifts each image by up to ``max_shift`` pixels (edge fill)."""
  if max_shift <= 0:
    return images
  n, h, w, _ = images.shape
  p = max_shift
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
  dy = rng.integers(0, 2 * p + 1, size=n)
  dx = rng.integers(0, 2 * p + 1, size=n)
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
