"""Image sources, by name. Every source yields real images as float arrays in [0, 1].

The embedded default needs no download: photographs that ship inside scikit-image and
scikit-learn (whole and in quadrants) and scikit-image's 200 LFW crops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from leakkit.errors import ConfigError, InputError
from leakkit.registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Sample:
    """One private example: `image` is H x W x C float32 in [0, 1]; `label` None if unknown."""

    image: np.ndarray
    label: int | None
    name: str


Source = Callable[[str], list[Sample]]
SOURCES: Registry[Source] = Registry("data source")

_SKIMAGE_COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
_SKIMAGE_GREY = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock", "page", "text")


def _views(name: str, im: np.ndarray) -> list[Sample]:
    """The centre square of a photo and its four quadrants: five distinct real images."""
    h, w = im.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    crops = {
        "centre": im[top : top + m, left : left + m],
        "q1": im[: h // 2, : w // 2],
        "q2": im[: h // 2, w // 2 :],
        "q3": im[h // 2 :, : w // 2],
        "q4": im[h // 2 :, w // 2 :],
    }
    return [Sample(_as_float(c), None, f"{name}/{k}") for k, c in crops.items()]


def _as_float(im: np.ndarray) -> np.ndarray:
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.float32)
    elif np.issubdtype(im.dtype, np.integer):
        im = im.astype(np.float32) / float(np.iinfo(im.dtype).max)
    im = im.astype(np.float32)
    if im.ndim == 2:
        im = im[..., None]
    if im.shape[-1] == 4:
        im = im[..., :3]
    return np.clip(im, 0.0, 1.0)


@SOURCES.register("embedded", description="photos + faces shipped in scikit-image/scikit-learn (259 images, no download)")
def embedded(path: str = "") -> list[Sample]:
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    samples: list[Sample] = []
    for name in _SKIMAGE_COLOUR:
        samples += _views(f"skimage/{name}", getattr(skdata, name)())
    sk = load_sample_images()
    for fname, im in zip(sk.filenames, sk.images):
        samples += _views(f"sklearn/{Path(fname).stem}", im)
    for name in _SKIMAGE_GREY:
        samples.append(Sample(_as_float(getattr(skdata, name)()), None, f"skimage/{name}"))
    for i, face in enumerate(skdata.lfw_subset()):
        samples.append(Sample(_as_float(face), None, f"skimage/lfw_subset/{i}"))
    return samples


@SOURCES.register("digits", description="scikit-learn's 1797 handwritten digits (8x8, labelled 0-9)")
def digits(path: str = "") -> list[Sample]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return [Sample(_as_float(im / 16.0), int(y), f"digits/{i}") for i, (im, y) in enumerate(zip(d.images, d.target))]


@SOURCES.register("files", description="an image file or a folder of images (data.path); one image per sample")
def files(path: str = "") -> list[Sample]:
    if not path:
        raise ConfigError("data source 'files' needs data.path (an image file or folder)")
    root = Path(path)
    if not root.exists():
        raise InputError(f"input not found: {root}")
    if not root.is_dir():
        return [Sample(read_image(root), None, str(root))]
    found = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    samples, skipped = [], [p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
    for p in found:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            try:
                samples.append(Sample(read_image(p), None, str(p)))
            except InputError:
                skipped.append(p)  # named like an image, but not one
    if skipped:
        warnings.warn(f"skipped {len(skipped)} file(s) in {root} that are not readable images (e.g. {skipped[0].name})", stacklevel=2)
    if not samples:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) that can be read in folder {root}")
    return samples


@SOURCES.register("hf-imagefolder", description="a Hugging Face `datasets` image folder on disk (data.path), labels from sub-folders")
def hf_imagefolder(path: str = "") -> list[Sample]:
    if not path or not Path(path).is_dir():
        raise InputError(f"hf-imagefolder needs data.path to be a folder, got {path!r}")
    import datasets

    datasets.disable_progress_bars()  # its bars would interleave with leakkit's one-line messages on stderr
    ds = datasets.load_dataset("imagefolder", data_dir=path, split="train")
    return _from_hf(ds, path)


@SOURCES.register("hf-disk", description="a Hugging Face dataset saved with save_to_disk (data.path) with an image column")
def hf_disk(path: str = "") -> list[Sample]:
    if not path or not Path(path).is_dir():
        raise InputError(f"hf-disk needs data.path to be a folder, got {path!r}")
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    return _from_hf(ds, path)


def _from_hf(ds, path: str) -> list[Sample]:
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    if image_col is None:
        raise InputError(f"dataset at {path} has no image column (looked for image, img)")
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    out = []
    for i, row in enumerate(ds):
        label = int(row[label_col]) if label_col is not None else None
        out.append(Sample(_as_float(np.asarray(row[image_col].convert("RGB"))), label, f"{path}#{i}"))
    return out


@SOURCES.register("torchvision", description="a torchvision dataset from a local root: data.path='CIFAR10:/root' (optional extra)")
def torchvision_source(path: str = "") -> list[Sample]:
    from leakkit.tasks.models import torchvision_available

    if not torchvision_available():
        raise ConfigError("data source 'torchvision' needs torchvision, which does not import here")
    import torchvision

    name, _, root = path.partition(":")
    if not hasattr(torchvision.datasets, name) or not root:
        raise ConfigError(f"data.path must be 'DatasetName:/local/root', got {path!r}")
    ds = getattr(torchvision.datasets, name)(root=root, download=False)
    return [Sample(_as_float(np.asarray(im.convert("RGB"))), int(y), f"{name}#{i}") for i, (im, y) in enumerate(ds)]


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to H x W x C float32 in [0, 1]; InputError if missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"input not found: {path}")
    try:
        with Image.open(path) as im:
            return _as_float(np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e.__class__.__name__}") from None


def resize(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize to size x size (bicubic), and match the channel count.

    Returns: C x H x W float32 in [0, 1].
    """
    from PIL import Image

    h, w = image.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    sq = image[top : top + m, left : left + m]
    planes = [
        np.asarray(Image.fromarray(sq[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
        for c in range(sq.shape[-1])
    ]
    out = np.stack(planes, axis=0)
    if out.shape[0] == 1 and channels == 3:
        out = np.repeat(out, 3, axis=0)
    elif out.shape[0] == 3 and channels == 1:
        out = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def draw(source: str, path: str, n: int, *, seed: int, shuffle: bool = True) -> list[Sample]:
    """Draw n samples from a source: a seeded shuffle of its images, cycled if n exceeds them."""
    pool = SOURCES.get(source)(path)
    if not pool:
        raise InputError(f"data source {source!r} yielded no images")
    order = np.random.default_rng(seed).permutation(len(pool)) if shuffle else np.arange(len(pool))
    return [pool[int(order[i % len(pool)])] for i in range(n)]
