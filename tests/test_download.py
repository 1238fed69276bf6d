"""MNIST download: real HTTP against a local server, checksums, cache reuse, mirror fallback."""

import contextlib
import functools
import hashlib
import http.server
import threading

import pytest

from conftest import SHARED_MNIST, cli, record
from parallelnn.data.idx import MNIST_FILES, read_mnist_dir
from parallelnn.data.sources import MNIST_SHA256, content_sha256, download_mnist
from parallelnn.errors import UserError
from test_idx import write_mnist


@contextlib.contextmanager
def serve(directory):
    """An HTTP server on 127.0.0.1 serving ``directory``; yields (base URL, list of requested paths)."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


def sums_of(directory):
    return {stem: content_sha256(directory / (stem + ".gz")) for stem in MNIST_FILES.values()}


def test_downloads_verifies_and_reuses_the_cache(tmp_path):
    served = tmp_path / "served"
    arrays = write_mnist(served)
    cache = tmp_path / "cache"
    with serve(served) as (url, requests):
        got = download_mnist(cache, mirrors=(url,), checksums=sums_of(served), log=lambda m: None)
        assert len(requests) == 4
        assert (read_mnist_dir(got)["train_labels"] == arrays["train_labels"]).all()
        download_mnist(cache, mirrors=(url,), checksums=sums_of(served), log=lambda m: None)
        assert len(requests) == 4, "a verified cache must not be fetched again"


def test_a_checksum_mismatch_keeps_nothing(tmp_path):
    served = tmp_path / "served"
    write_mnist(served)
    wrong = {stem: hashlib.sha256(b"other").hexdigest() for stem in MNIST_FILES.values()}
    cache = tmp_path / "cache"
    with serve(served) as (url, _):
        with pytest.raises(UserError, match="SHA-256 .* does not match"):
            download_mnist(cache, mirrors=(url,), checksums=wrong, log=lambda m: None)
    assert list(cache.iterdir()) == []


def test_falls_back_to_the_next_mirror(tmp_path):
    served, empty = tmp_path / "served", tmp_path / "empty"
    write_mnist(served)
    empty.mkdir()
    with serve(empty) as (bad, bad_requests), serve(served) as (good, _):
        download_mnist(tmp_path / "cache", mirrors=(bad, good), checksums=sums_of(served), log=lambda m: None)
    assert len(bad_requests) == 4


def test_unreachable_mirror_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="could not download train-images-idx3-ubyte"):
        download_mnist(tmp_path / "cache", mirrors=("http://127.0.0.1:9/",), timeout=2, log=lambda m: None)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="full MNIST not present at ../shared/data/mnist")
def test_cli_download_of_the_real_files_with_the_official_checksums(tmp_path):
    """The real --download path: official content checksums, served from a local mirror."""
    assert sums_of(SHARED_MNIST) == MNIST_SHA256
    with serve(SHARED_MNIST) as (url, requests):
        env = {"PARALLELNN_MNIST_MIRROR": url, "PARALLELNN_CACHE": str(tmp_path / "cache")}
        out = tmp_path / "run"
        proc = cli("run", "mnist", "--download", "--epochs", "1", "--limit", "512", "--out", str(out),
                   "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(requests) == 4
    rec = record(out)
    assert rec["dataset"].startswith("mnist (official")
    assert rec["test_samples"] == 10_000
