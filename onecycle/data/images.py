"""One image file: what it may cost, and decoding it.

Every file's declared size (``data.max_file_mb``), an archive's declared total
(``data.max_total_mb``) and every image's declared pixel count (``data.max_image_pixels``) are
checked before anything is read or decoded. The image-folder and archive readers and predict
decode through :func:`decode` / :func:`decode_image`, so an image reads the same everywhere.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from onecycle.errors import DataError

MB = 1 << 20  # data.max_file_mb counts MiB


@dataclass(frozen=True)
class Limits:
    """``data.max_image_pixels``, ``data.max_file_mb`` and ``data.max_total_mb``: what one image,
    one file and a whole archive's files may cost.

    All are checked on what headers declare, before anything is read or decoded, so a tiny
    archive cannot make the stage allocate gigabytes.
    """

    max_image_pixels: int
    max_file_mb: float
    max_total_mb: float = float("inf")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MB)

    def check_size(self, name: str, size: int) -> None:
        if size > self.max_file_bytes:
            raise DataError(
                f"{name}: {size:,} bytes, over data.max_file_mb={self.max_file_mb:g} "
                f"({self.max_file_bytes:,} bytes); refused before reading it. If files this "
                "large are expected, raise it: dvc exp run -S data.max_file_mb=<MiB>"
            )

    def check_total(self, archive: object, total: int) -> None:
        """``total``: the bytes the archive's image files declare so far (read into memory)."""
        if total > self.max_total_mb * MB:
            raise DataError(
                f"{archive}: its image files declare over {total:,} bytes in all, over "
                f"data.max_total_mb={self.max_total_mb:g} ({int(self.max_total_mb * MB):,} "
                "bytes); refused from its headers, before reading (an archive is held in "
                "memory while it is decoded). If the dataset is this large, raise it: dvc exp "
                "run -S data.max_total_mb=<MiB>"
            )


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own decompression-bomb check at ``data.max_image_pixels``, its warning an error.

    PIL checks the size each header declares when :func:`Image.open` reads it, before any pixel
    is decoded, and again for frames it loads later (ICO, GIF); left alone it only warns,
    unnamed, below twice its own limit (89 MP) and decodes the image anyway.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


class ImageTooLarge(DataError):
    """An image whose header declares more pixels than the limit; ``size`` is what it declares
    (predict names its own option instead of the data stage's key)."""

    def __init__(self, name: str, size: str, max_pixels: int):
        super().__init__(
            f"{name}: image too large ({size}), over data.max_image_pixels={max_pixels:,}; "
            "refused before decoding it. If images this large are expected, raise it: "
            "dvc exp run -S data.max_image_pixels=<pixels>"
        )
        self.name, self.size, self.max_pixels = name, size, max_pixels


def _too_large(name: str, data: bytes, max_pixels: int, exc: Exception) -> DataError:
    """Name the image, the size its header declares and the key (PIL names neither file nor key)."""
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: no pixels are decoded
            w, h = img.size
        size = f"{w}x{h} = {w * h:,} pixels"
    except Exception:
        size = str(exc)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return ImageTooLarge(name, size, max_pixels)


class UnreadableImage(DataError):
    """A file that does not decode as an image (a dataset's reader adds what to do about it)."""


def decode(data: bytes, name: str, image_size: int, max_pixels: int) -> np.ndarray:
    """Decode one image to RGB at ``image_size``; call it inside :func:`pixel_limit`."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header, checks its pixel count
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise _too_large(name, data, max_pixels, exc) from None
    except UnidentifiedImageError:  # its text names the in-memory buffer, not the file
        raise UnreadableImage(f"{name}: unreadable image (not a format PIL can identify)") from None
    except Exception as exc:
        raise UnreadableImage(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from None


def decode_image(data: bytes, name: str, image_size: int, max_pixels: int) -> np.ndarray:
    """One image file's bytes as the data stage reads them: RGB uint8 (H, W, 3) at
    ``image_size``, grayscale and palette images converted, other sizes resized."""
    with pixel_limit(max_pixels):
        return decode(data, name, image_size, max_pixels)
