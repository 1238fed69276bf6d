"""Where data comes from: the embedded defaults, and the MNIST download with checksums and a cache.

The download checks the SHA-256 of each file's *uncompressed* content: mirrors re-compress the
files (so the .gz bytes differ), but the content is the official one. A file is moved into the cache
only after its checksum matched, so an interrupted or corrupted download never poisons the cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from parallelnn.errors import UserError

EMBEDDED_MNIST = "mnist-5k (embedded subset)"

# Mirrors tried in order (the same ones torchvision uses); PARALLELNN_MNIST_MIRROR puts one first.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# SHA-256 of the uncompressed official files (their MD5s match the ones published with MNIST).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def cache_dir() -> Path:
    """``$PARALLELNN_CACHE``, else ``$XDG_CACHE_HOME/parallelnn``, else ``~/.cache/parallelnn``."""
    if os.environ.get("PARALLELNN_CACHE"):
        return Path(os.environ["PARALLELNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parallelnn"


def embedded_mnist_dir() -> Path:
    return Path(str(resources.files("parallelnn") / "data" / "embedded" / "mnist5k"))


def content_sha256(path: Path) -> str:
    """SHA-256 of the file's content, decompressed when it is gzip (whatever its name)."""
    from parallelnn.record import sha256_file

    with open(path, "rb") as fh:
        head = fh.read(2)
    return sha256_file(path, gunzip=head == b"\x1f\x8b")


def _fetch(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def download_mnist(directory: Path | None = None, mirrors: tuple[str, ...] | None = None,
                   checksums: dict[str, str] | None = None, timeout: float = 30.0,
                   log=print) -> Path:
    """Make sure the four MNIST files are in ``directory`` (default: the cache), fetching what is missing.

    Files already present with the right checksum are reused; everything is verified before it is kept.
    """
    directory = Path(directory) if directory else cache_dir() / "mnist"
    checksums = checksums or MNIST_SHA256
    if mirrors is None:
        extra = os.environ.get("PARALLELNN_MNIST_MIRROR")
        mirrors = ((extra,) if extra else ()) + MNIST_MIRRORS
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the MNIST cache {directory}: {err.strerror}")
    for stem, sha in checksums.items():
        final = directory / (stem + ".gz")
        if final.is_file() and content_sha256(final) == sha:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + stem + ".gz"
            fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".part", dir=directory)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                log(f"downloading {url}")
                _fetch(url, tmp, timeout)
                got = content_sha256(tmp)
                if got != sha:
                    errors.append(f"{url}: SHA-256 {got[:12]}… does not match {sha[:12]}…")
                    continue
                os.replace(tmp, final)
                break
            except (urllib.error.URLError, OSError, EOFError, ValueError) as err:
                errors.append(f"{url}: {getattr(err, 'reason', err)}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise UserError(f"could not download {stem}: " + "; ".join(errors))
    return directory
