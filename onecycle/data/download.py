"""Downloads for the download stage: an official archive (torchvision's, MD5-checked) or an
image-folder archive by URL, into a temporary file in ``data/raw`` renamed into place once
checked; credentials for a private URL from the environment, never from params.yaml."""

from __future__ import annotations

import hashlib
import os
import socket
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from onecycle.errors import DataError
from onecycle.files import TMP_SUFFIX

if TYPE_CHECKING:
    from onecycle.data import sources


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


CREDENTIAL_VARIABLES = ("ONECYCLE_DATA_USERNAME", "ONECYCLE_DATA_PASSWORD")


ASKS_FOR_CREDENTIALS = (
    "The server asks for credentials: put them in ~/.netrc (machine <host> login <user> password "
    "<password>) or in ONECYCLE_DATA_USERNAME and ONECYCLE_DATA_PASSWORD, never in data.source."
)


def credentials(url: str) -> tuple[str, str] | None:
    """(user, password) for downloading ``url``: ONECYCLE_DATA_USERNAME/PASSWORD, else the
    ``machine`` entry of its host in ~/.netrc (or the file NETRC names); None without any.
    Never data.source itself: DVC records params in dvc.lock."""
    import netrc

    user, password = (os.environ.get(v) for v in CREDENTIAL_VARIABLES)
    if user and password:
        return user, password
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.exists(path):
        return None
    try:
        found = netrc.netrc(path).authenticators(urlparse(url).hostname or "")
    except netrc.NetrcParseError as exc:  # its message may quote a password: the line only
        raise DataError(f"{path}: line {exc.lineno} is not netrc syntax; fix it") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    return (found[0], found[2]) if found else None


def _fetch_with_credentials(url: str, dest: Path, user: str, password: str) -> None:
    """``url`` into ``dest`` with HTTP basic auth, sent only to ``url``'s own host and path: a
    redirect elsewhere gets no credentials (urllib keeps them in an unredirected header)."""
    import shutil
    import urllib.request

    passwords = urllib.request.HTTPPasswordMgrWithPriorAuth()
    passwords.add_password(None, url, user, password, is_authenticated=True)
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(passwords))
    request = urllib.request.Request(url, headers={"User-Agent": "onecycle"})
    with opener.open(request) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _download(
    url: str, raw_dir: Path, filename: str, timeout: float, hint: str, check: Callable[[Path], None]
) -> Path:
    """Download into a temporary folder in ``raw_dir``, ``check(path)`` it, then rename it to
    ``raw_dir/filename``: a partial, failed or refused download never reaches ``raw_dir``.

    ``timeout`` bounds each wait for the network; ``hint`` says what to do without one.
    """
    from torchvision.datasets.utils import download_url

    login = credentials(url)
    raw_dir.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".partial-", suffix=TMP_SUFFIX) as tmp:
            # No md5= here: download_url would raise a bare "File not found or corrupted."
            # RuntimeError; check says what failed.
            got = Path(tmp) / filename
            if login:
                _fetch_with_credentials(url, got, *login)
            else:
                download_url(url, tmp, filename=filename)
            check(got)
            os.replace(got, raw_dir / filename)
    except DataError:
        raise
    except Exception as exc:  # urllib, socket and torchvision all raise their own kinds
        if getattr(exc, "code", None) == 401:
            hint = (
                ASKS_FOR_CREDENTIALS
                if login is None
                else (
                    "The server refused the credentials from ONECYCLE_DATA_USERNAME/PASSWORD or "
                    "~/.netrc: check them."
                )
            )
        raise DataError(f"could not download {url} ({type(exc).__name__}: {exc}).\n{hint}") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    return raw_dir / filename


def download_official(spec: sources.Official, url: str, raw_dir: Path, timeout: float) -> Path:
    """Download and MD5-check an official archive; a verified copy in ``raw_dir`` is reused."""
    from torchvision.datasets.utils import check_integrity

    target = raw_dir / spec.filename
    if check_integrity(str(target), spec.md5):
        return target

    def check(got: Path) -> None:
        if not check_integrity(str(got), spec.md5):
            raise DataError(
                f"{url}: downloaded file failed its MD5 check (got {md5sum(got)}, expected "
                f"{spec.md5}); it is corrupt or not the official {spec.filename}. Retry, or "
                f"point data.source at a verified local copy: "
                f"dvc exp run -S data.source=/path/to/{spec.filename}"
            )

    hint = (
        f"Without network access, fetch {spec.filename} elsewhere and point the stage at it:\n"
        f"  dvc exp run -S data.source=/path/to/{spec.filename}\n"
        "or at an image-folder copy (train/<class>/*, test/<class>/*), e.g. "
        "data.source=../shared/datasets/cifar10-jpg.tar.gz"
    )
    return _download(url, raw_dir, spec.filename, timeout, hint, check)


def download_archive(url: str, filename: str, raw_dir: Path, timeout: float) -> Path:
    """Download an image-folder archive into ``raw_dir``, every time.

    Nothing says whether an earlier copy is still what the URL serves, so none is reused; the
    description of the source records the MD5 of what was read.
    """
    is_zip = filename.lower().endswith(".zip")

    def check(got: Path) -> None:  # headers only: an error page must not land in raw_dir
        if not (zipfile.is_zipfile(got) if is_zip else tarfile.is_tarfile(got)):
            raise DataError(
                f"{url}: the downloaded file is not a {'zip' if is_zip else 'tar'} archive (an "
                "error page, or another file under that name?); check the URL"
            )

    hint = (
        f"Without network access, download {filename} elsewhere and point the stage at it:\n"
        f"  dvc exp run -S data.source=/path/to/{filename}"
    )
    return _download(url, raw_dir, filename, timeout, hint, check)
