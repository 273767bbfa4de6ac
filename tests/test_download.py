"""download.py against a real HTTP server on 127.0.0.1 that behaves like the hub's resolve endpoint.

The fake hub serves small files with a git-blob-sha1 ETag and "LFS" files the way the hub does: a 302 carrying
X-Linked-Etag (the sha256) to a CDN path that serves the bytes with an unrelated ETag. It honours
"Range: bytes=N-" (206, or 416 past the end) unless told to ignore it, counts the body bytes it sends per
file, can cut a body short, answer 503 a few times, and records every Authorization header.
"""

import hashlib
import json
import random
import socket
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import download
from download import (HH_RLHF_EXPECTED, download_dataset_files, download_file, download_model, hub_url,
                      make_session)

SHARED_HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf"


class FakeHub:
    def __init__(self):
        self.files = {}             # repo path ("/org/m/resolve/main/config.json") → bytes
        self.lfs = set()            # paths served through a 302 with X-Linked-Etag
        self.etag_override = {}     # path → sha256 to announce instead of the true one
        self.ignore_range = False
        self.cut_after = {}         # path → bytes to send on the next GET before dropping the connection
        self.fail_first = Counter()  # path → number of 503 answers before serving
        self.served = Counter()     # path → body bytes sent
        self.auth = []              # Authorization headers seen, in order
        self.lock = threading.Lock()

    def add(self, path, data, lfs=False):
        self.files[path] = data
        if lfs:
            self.lfs.add(path)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        hub = self.server.hub
        with hub.lock:
            hub.auth.append(self.headers.get("Authorization"))
        path, cdn = self.path, self.path.startswith("/cdn/")
        repo_path = path[len("/cdn"):] if cdn else path
        data = hub.files.get(repo_path)
        if data is None:
            return self.reply(404, {}, b"Entry not found" if body else b"")
        with hub.lock:
            if hub.fail_first[repo_path] > 0:
                hub.fail_first[repo_path] -= 1
                return self.reply(503, {}, b"")
        sha = hub.etag_override.get(repo_path, hashlib.sha256(data).hexdigest())
        if repo_path in hub.lfs and not cdn:  # the hub: redirect to the CDN, checksum in X-Linked-Etag
            return self.reply(302, {"Location": "/cdn" + repo_path, "X-Linked-Etag": f'"{sha}"',
                                    "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"'}, b"")
        if cdn:
            etag = hashlib.md5(data).hexdigest()  # a CDN's own tag: not the sha256
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # small file: git blob sha1
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        status, start = 200, 0
        if m and not hub.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                return self.reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        headers["Content-Length"] = str(len(payload))
        if not body:
            return self.reply(status, headers, b"")
        cut = hub.cut_after.pop(repo_path, None)
        sent = payload[:cut] if cut is not None else payload
        with hub.lock:
            hub.served[repo_path] += len(sent)
        self.reply(status, headers, sent)

    def reply(self, status, headers, payload):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True  # a short body then ends the connection: the client sees it cut off


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = FakeHub()
    server.hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def session():
    return make_session(retries=3, backoff_factor=0)


def blob(n, seed):
    return random.Random(seed).randbytes(n)


REPO = "org/tiny"


def add_model_repo(hub, layout):
    """A small model repository with the given weight layout; returns {file: bytes} that should be fetched."""
    want = {"config.json": b'{"vocab_size": 32000}', "tokenizer.model": blob(3000, 1),
            "tokenizer_config.json": b'{"add_bos_token": true}'}
    if layout == "model.safetensors.index.json":
        index = {"metadata": {"total_size": 0}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}}
        want[layout] = json.dumps(index).encode()
        want["model-00001-of-00002.safetensors"] = blob(300_000, 2)
        want["model-00002-of-00002.safetensors"] = blob(200_000, 3)
    elif layout == "pytorch_model.bin.index.json":
        index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
        want[layout] = json.dumps(index).encode()
        want["pytorch_model-00001-of-00002.bin"] = blob(100_000, 4)
        want["pytorch_model-00002-of-00002.bin"] = blob(100_000, 5)
    else:
        want[layout] = blob(250_000, 6)
    for name, data in want.items():
        hub.add(f"/{REPO}/resolve/main/{name}", data, lfs=name.endswith((".model", ".safetensors", ".bin")))
    return want


def test_sharded_safetensors_repo_is_fetched_whole_and_a_bin_beside_it_is_not(hub, tmp_path, capsys):
    want = add_model_repo(hub, "model.safetensors.index.json")
    hub.add(f"/{REPO}/resolve/main/pytorch_model.bin", blob(1000, 9), lfs=True)  # ignored: safetensors first
    paths = download_model(session(), REPO, tmp_path, endpoint=hub.endpoint, progress=False)
    assert sorted(p.name for p in paths) == sorted(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(want)  # no .part left, no .bin
    for name, data in want.items():
        assert (tmp_path / name).read_bytes() == data
        assert hub.served[f"/{REPO}/resolve/main/{name}"] == len(data)  # each byte sent once
    # LFS files are checked against the sha256 in the redirect's X-Linked-Etag; small files' git sha1 is not used
    report = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name, data in want.items():
        line = report[str(tmp_path / name)]
        assert f"{len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}" in line
        assert line.endswith("  unverified" if name.endswith(".json") else "  verified")


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"])
def test_each_weight_layout_is_discovered(hub, tmp_path, layout):
    want = add_model_repo(hub, layout)
    download_model(session(), REPO, tmp_path, endpoint=hub.endpoint, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == want


def test_resume_fetches_only_the_bytes_missing_from_the_part_file(hub, tmp_path, capsys):
    data = blob(500_000, 7)
    path = f"/{REPO}/resolve/main/model.safetensors"
    hub.add(path, data, lfs=True)
    (tmp_path / "model.safetensors.part").write_bytes(data[:123_457])
    download_file(session(), hub.endpoint + path, tmp_path / "model.safetensors", progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == data
    assert hub.served[path] == len(data) - 123_457
    assert "verified" in capsys.readouterr().out


def test_a_body_cut_off_midway_resumes_from_where_it_stopped(hub, tmp_path, capsys):
    data = blob(400_000, 8)
    path = f"/{REPO}/resolve/main/model.safetensors"
    hub.add(path, data, lfs=True)
    hub.cut_after[path] = 150_000
    # 1,000-byte reads: the cut falls on a chunk boundary, so every byte received reached the .part
    # (with bigger chunks a cut loses at most the chunk being read, and that is fetched again)
    download_file(session(), hub.endpoint + path, tmp_path / "w.safetensors", progress=False, chunk_size=1000)
    assert (tmp_path / "w.safetensors").read_bytes() == data
    assert hub.served[path] == len(data)  # 150,000 then the remaining 250,000: nothing fetched twice
    assert "ChunkedEncodingError at byte 150000; resuming" in capsys.readouterr().out


def test_a_server_that_ignores_range_restarts_from_byte_zero(hub, tmp_path, capsys):
    data = blob(200_000, 10)
    path = f"/{REPO}/resolve/main/model.safetensors"
    hub.add(path, data, lfs=True)
    hub.ignore_range = True
    (tmp_path / "w.part").write_bytes(b"stale bytes from some other file")
    download_file(session(), hub.endpoint + path, tmp_path / "w", progress=False)
    assert (tmp_path / "w").read_bytes() == data
    assert hub.served[path] == len(data)
    assert "ignored the Range request" in capsys.readouterr().out


def test_a_complete_part_file_is_finished_without_fetching_a_byte(hub, tmp_path):
    data = blob(50_000, 11)
    path = f"/{REPO}/resolve/main/model.safetensors"
    hub.add(path, data, lfs=True)
    (tmp_path / "w.part").write_bytes(data)  # the rename had not happened yet
    download_file(session(), hub.endpoint + path, tmp_path / "w", progress=False)
    assert (tmp_path / "w").read_bytes() == data and hub.served[path] == 0


def test_server_errors_are_retried(hub, tmp_path):
    path = f"/{REPO}/resolve/main/config.json"
    hub.add(path, b"{}")
    hub.fail_first[path] = 2
    download_file(session(), hub.endpoint + path, tmp_path / "config.json", progress=False)
    assert (tmp_path / "config.json").read_bytes() == b"{}"


def test_checksum_mismatch_with_the_hub_etag_leaves_no_file(hub, tmp_path):
    data = blob(20_000, 12)
    path = f"/{REPO}/resolve/main/model.safetensors"
    hub.add(path, data, lfs=True)
    hub.etag_override[path] = "ab" * 32
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 mismatch: expected (ab){32}, got "):
        download_file(session(), hub.endpoint + path, tmp_path / "model.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part


def test_a_sha256_flag_that_disagrees_stops_the_cli_naming_the_file(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    add_model_repo(hub, "model.safetensors")
    with pytest.raises(SystemExit, match=r"download\.py: config\.json: sha256 mismatch: expected (cd){32}"):
        download.main(["model", REPO, "--out", str(tmp_path), "--endpoint", hub.endpoint, "--no-progress",
                       "--sha256", "config.json=" + "cd" * 32])
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "config.json.part").exists()


def test_missing_file_is_a_one_line_error_naming_url_and_file(hub, tmp_path):
    url = hub_url(hub.endpoint, "Anthropic/hh-rlhf", "nope/train.jsonl.gz", repo_type="dataset")
    assert url == f"{hub.endpoint}/datasets/Anthropic/hh-rlhf/resolve/main/nope/train.jsonl.gz"
    with pytest.raises(ValueError) as e:
        download_dataset_files(session(), "Anthropic/hh-rlhf", ["nope/train.jsonl.gz"], tmp_path,
                               endpoint=hub.endpoint, progress=False)
    assert str(e.value) == f"train.jsonl.gz: not found (HTTP 404) at {url}"
    assert not (tmp_path / "nope").exists() or not any((tmp_path / "nope").iterdir())


def test_a_repo_without_weights_is_an_error_listing_what_was_tried(hub, tmp_path):
    hub.add(f"/{REPO}/resolve/main/config.json", b"{}")
    hub.add(f"/{REPO}/resolve/main/tokenizer.model", b"x")
    with pytest.raises(ValueError, match="no weights .*model.safetensors.index.json, model.safetensors, "
                                         "pytorch_model.bin.index.json, pytorch_model.bin"):
        download_model(session(), REPO, tmp_path, endpoint=hub.endpoint, progress=False)


def test_an_index_naming_a_shard_outside_the_folder_is_refused(hub, tmp_path):
    add_model_repo(hub, "model.safetensors.index.json")
    hub.files[f"/{REPO}/resolve/main/model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"x": "../../evil.safetensors"}}).encode()
    with pytest.raises(ValueError, match=r"refusing file name '../../evil.safetensors'"):
        download_model(session(), REPO, tmp_path, endpoint=hub.endpoint, progress=False)
    assert not (tmp_path.parent.parent / "evil.safetensors").exists()
    assert not any(p.name.startswith("model-") for p in tmp_path.iterdir())  # refused before any shard


def test_token_is_sent_as_bearer_and_never_appears_in_output(hub, tmp_path, monkeypatch, capsys):
    token = "hf_secretTOKEN123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)  # endpoint from the environment this time
    want = add_model_repo(hub, "model.safetensors.index.json")
    download.main(["model", REPO, "--out", str(tmp_path)])  # progress bars on
    assert {p.name for p in tmp_path.iterdir()} == set(want)
    assert hub.auth and all(a == f"Bearer {token}" for a in hub.auth)
    out, err = capsys.readouterr()
    assert token not in out and token not in err and "sha256" in out
    assert not any(token.encode() in p.read_bytes() for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:  # errors do not carry it either
        download.main(["dataset", "Anthropic/hh-rlhf", "missing.jsonl.gz", "--out", str(tmp_path)])
    assert token not in str(e.value) and "HTTP 404" in str(e.value)


def test_existing_files_are_skipped_without_a_request(hub, tmp_path):
    (tmp_path / "config.json").write_bytes(b"{}")
    download_file(session(), f"{hub.endpoint}/{REPO}/resolve/main/config.json", tmp_path / "config.json")
    assert hub.auth == []


def test_hh_rlhf_table_matches_the_lfs_pointers_recorded_in_shared_data():
    readme = (SHARED_HH.parent / "README.md").read_text(encoding="utf-8")
    pointers = {name: (sha, int(size)) for name, sha, size in
                re.findall(r"\* (\S+/train\.jsonl\.gz): sha256 ([0-9a-f]{64}), (\d+) bytes", readme)}
    assert len(pointers) == 3
    sums = dict(reversed(line.split()) for line in (SHARED_HH.parent / "SHA256SUMS").read_text().splitlines())
    test_file = "helpful-base/test.jsonl.gz"
    pointers[test_file] = (sums[f"hh-rlhf/{test_file}"], (SHARED_HH / test_file).stat().st_size)
    assert HH_RLHF_EXPECTED == pointers


def test_hh_rlhf_cli_fetches_test_splits_and_checks_them_against_the_table(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for subset in download.HH_RLHF_SUBSETS:
        name = f"{subset}/test.jsonl.gz"
        hub.add(f"/datasets/Anthropic/hh-rlhf/resolve/main/{name}", (SHARED_HH / name).read_bytes())
    paths = download.main(["hh-rlhf", "--splits", "test", "--out", str(tmp_path), "--endpoint", hub.endpoint,
                           "--no-progress"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == download.hh_rlhf_files(["test"])
    for p in paths:
        assert p.read_bytes() == (SHARED_HH / p.relative_to(tmp_path)).read_bytes()
    # train files: one without a table entry is fetched unverified; one whose bytes differ from the table stops
    hub.add("/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/train.jsonl.gz", b"no checksum known")
    hub.add("/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz", b"not the real file")
    with pytest.raises(SystemExit, match="train.jsonl.gz: sha256 mismatch: expected 518a5bf2"):
        download.main(["hh-rlhf", "--splits", "train", "--out", str(tmp_path), "--endpoint", hub.endpoint,
                       "--no-progress"])
    assert (tmp_path / "harmless-base/train.jsonl.gz").read_bytes() == b"no checksum known"
    assert not any((tmp_path / "helpful-base").glob("train*"))


def test_an_unreachable_server_is_a_one_line_error_after_the_bounded_attempts(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError) as e:
        download_file(make_session(retries=0), f"http://127.0.0.1:{port}/o/m/resolve/main/config.json",
                      tmp_path / "config.json", progress=False, attempts=2)
    assert str(e.value).startswith("config.json: download failed after 2 attempts at byte 0: ConnectionError")
    assert "\n" not in str(e.value) and not (tmp_path / "config.json").exists()
