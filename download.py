"""Fetch a Hugging Face hub model repository or dataset files: resumable, retried, checksummed.

    python download.py model openlm-research/open_llama_3b_v2 --out checkpoints/open_llama_3b_v2
    python download.py hh-rlhf --out downloads/hh-rlhf                  # 4 subsets × train, test
    python download.py dataset OWNER/NAME path/in/repo.jsonl … --out downloads/NAME

A model download fetches config.json and tokenizer.model (required), tokenizer_config.json,
generation_config.json and special_tokens_map.json where present, and ONE weight layout, the first of
    1. model.safetensors.index.json + its shards     2. model.safetensors
    3. pytorch_model.bin.index.json + its shards     4. pytorch_model.bin
that exists (safetensors first: no pickle). Dataset files keep their repository paths under --out.

URLs: {endpoint}/{repo}/resolve/{revision}/{file} for models and
{endpoint}/datasets/{repo}/resolve/{revision}/{file} for datasets; endpoint = --endpoint, else $HF_ENDPOINT,
else https://huggingface.co. A token (gated or private repositories) comes from $HF_TOKEN only; it is sent as
"Authorization: Bearer …", never printed, and requests drops it when the hub redirects to its CDN host.

Every file
- is written to NAME.part, fsynced, and renamed to NAME only when complete and verified, so an existing NAME
  is finished: it is skipped without being hashed again;
- resumes a leftover NAME.part with "Range: bytes=N-": 206 → append; 200 (the server ignored Range) → start
  over; 416 → the .part already holds every byte;
- is retried on connection errors and 429/5xx by urllib3's Retry; a body cut off mid-stream resumes from the
  .part, at most --attempts times;
- is checked against every sha256 known for it: the hub's X-Linked-Etag / ETag when it is 64 hex digits (Git
  LFS files; a small file's ETag is its git blob sha1 and is not used), `--sha256 FILE=HEX`, and for
  HH-RLHF the table below. A mismatch deletes the .part and stops with the file's name. A file with no known
  checksum is reported as "unverified".
"""

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from files import fsync_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT = (10, 60)  # seconds: connect, and between two reads of the body

MODEL_FILES = ("config.json", "tokenizer.model")
MODEL_FILES_IF_PRESENT = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
WEIGHT_LAYOUTS = ("model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin")

HH_RLHF_REPO = "Anthropic/hh-rlhf"
HH_RLHF_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
# (sha256, bytes) from the Git LFS pointers in the anthropics/hh-rlhf GitHub repository
# (recorded in shared/data/README.md; helpful-base test also matches the copy in shared/data).
HH_RLHF_EXPECTED = {
    "helpful-base/train.jsonl.gz":
        ("518a5bf288456fc9f3b7c980c54116fba0c52f274d3f4d344675d83e4058f6f4", 16200131),
    "helpful-online/train.jsonl.gz":
        ("0994d18b82083f5c084ce04071b683958a724df8c7215ab1d851986642d36a2a", 20127228),
    "helpful-rejection-sampled/train.jsonl.gz":
        ("0cea2d2ab2187624ec1314e8cc6fb579f0fa987b3a33e8102b7556ed4d255f64", 25697148),
    "helpful-base/test.jsonl.gz":
        ("8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b", 875191),
}

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# --- HTTP ---

def make_session(token=None, retries=5, backoff_factor=0.5):
    """requests.Session with urllib3 retries on connection errors and 429/5xx, and the Bearer token if any."""
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff_factor,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET", "HEAD"}),
                  raise_on_status=False)  # the last response comes back; check_status words the error
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file itself
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def hub_url(endpoint, repo, filename, revision="main", repo_type="model"):
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{endpoint.rstrip('/')}/{prefix}{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def check_status(response, url, name):
    """One-line ValueError for an HTTP error status; the URL is named, the token never is."""
    code = response.status_code
    if code == 404:
        raise ValueError(f"{name}: not found (HTTP 404) at {url}")
    if code in (401, 403):
        raise ValueError(f"{name}: HTTP {code} at {url}: repository missing, private or gated; "
                         f"set HF_TOKEN to a token with access")
    if code >= 400:
        raise ValueError(f"{name}: HTTP {code} at {url}")


def exists(session, url, name):
    """HEAD without following redirects: the hub answers 302 for LFS files, 200 for small ones, 404 if absent."""
    r = session.head(url, allow_redirects=False, timeout=TIMEOUT)
    if r.status_code == 404:
        return False
    check_status(r, url, name)
    return True


def server_sha256(response):
    """The sha256 the hub gives for a file, or None. Read from the hub's own (first) response, not the CDN's."""
    first = response.history[0] if response.history else response
    for key in ("X-Linked-Etag", "ETag"):
        tag = first.headers.get(key, "").removeprefix("W/").strip('"').lower()
        if SHA256_RE.match(tag):
            return tag
    return None


def sha256_file(path, chunk_size=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h


# --- one file ---

def download_file(session, url, dest, sha256=None, size=None, progress=True, attempts=5, chunk_size=1 << 20):
    """Fetch url to dest via dest.part (resumable), verify, rename atomically. Returns dest.
    sha256: expected hex digest or None; size: expected bytes or None (both besides the server's etag)."""
    dest = Path(dest)
    name = dest.name
    if dest.exists():
        print(f"skip {dest} (exists)")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            digest, etag_sha = _fetch_once(session, url, part, name, progress, chunk_size)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                reason = " ".join(str(e).split())  # requests' message names host and URL, never headers
                raise ValueError(f"{name}: download failed after {attempts} attempts at byte {have}: "
                                 f"{type(e).__name__}: {reason}") from None
            print(f"{name}: {type(e).__name__} at byte {have}; resuming (attempt {attempt + 1}/{attempts})")
    got = part.stat().st_size
    expected = {h.lower() for h in (sha256, etag_sha) if h}
    for want in sorted(expected):
        if digest != want:
            part.unlink()
            raise ValueError(f"{name}: sha256 mismatch: expected {want}, got {digest} ({url}); removed {part}")
    if size is not None and got != size:
        part.unlink()
        raise ValueError(f"{name}: size mismatch: expected {size} bytes, got {got} ({url}); removed {part}")
    # NAME.part outlives a failed run (the next one resumes from its size), so this is not files.atomic_write
    os.replace(part, dest)
    fsync_dir(dest.parent)  # make the rename itself durable
    print(f"{dest}  {got} bytes  sha256 {digest}  {'verified' if expected else 'unverified'}")
    return dest


def _fetch_once(session, url, part, name, progress, chunk_size):
    """One GET into part, resuming from its size. Returns (sha256 hex of the whole part, server's sha256)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 416 and offset:  # nothing after byte `offset`: complete, or the .part is too long
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return sha256_file(part).hexdigest(), server_sha256(r)
            part.unlink()
            raise requests.ConnectionError(f"{name}: .part of {offset} bytes is longer than the file; restarting")
        check_status(r, url, name)
        if r.status_code == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise ValueError(f"{name}: asked {url} for bytes from {offset}, got Content-Range "
                                 f"{r.headers.get('Content-Range')!r}")
            total = int(m.group(2)) if m.group(2) != "*" else None
            h, mode = sha256_file(part), "ab"  # the hash covers the bytes already on disk
        else:  # 200: the whole file, also when a server ignores Range
            if offset:
                print(f"{name}: server ignored the Range request; starting over from byte 0")
            length = r.headers.get("Content-Length")
            offset, total = 0, int(length) if length and length.isdigit() else None
            h, mode = hashlib.sha256(), "wb"
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=name, disable=not progress, file=sys.stderr) as bar:
            for chunk in r.iter_content(chunk_size):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        got = part.stat().st_size
        if total is not None and got != total:
            raise requests.ConnectionError(f"{name}: body ended at byte {got} of {total}")
        return h.hexdigest(), server_sha256(r)


# --- repositories ---

def _repo_relative(name, source):
    """A file name from an index must stay inside the output folder."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise ValueError(f"{source}: refusing file name {name!r} (expected a relative path inside the repository)")
    return name


def download_model(session, repo, out, revision="main", endpoint=DEFAULT_ENDPOINT, sha256=None, progress=True,
                   attempts=5):
    """Config, tokenizer and the first weight layout of WEIGHT_LAYOUTS that exists. Returns the local paths."""
    out, sha256 = Path(out), sha256 or {}

    def fetch(name):
        return download_file(session, hub_url(endpoint, repo, name, revision), out / name, sha256.get(name),
                             progress=progress, attempts=attempts)

    paths = [fetch(name) for name in MODEL_FILES]
    paths += [fetch(name) for name in MODEL_FILES_IF_PRESENT
              if exists(session, hub_url(endpoint, repo, name, revision), name)]
    layout = next((name for name in WEIGHT_LAYOUTS
                   if exists(session, hub_url(endpoint, repo, name, revision), name)), None)
    if layout is None:
        raise ValueError(f"{repo}@{revision}: no weights at {endpoint} (tried {', '.join(WEIGHT_LAYOUTS)})")
    paths.append(fetch(layout))
    if layout.endswith(".index.json"):
        try:
            weight_map = json.loads(paths[-1].read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{paths[-1]}: not a shard index with a 'weight_map' ({type(e).__name__}: {e})") from None
        shards = sorted(set(weight_map.values()))
        print(f"{layout}: {len(weight_map)} tensors in {len(shards)} shards")
        paths += [fetch(_repo_relative(shard, paths[-1])) for shard in shards]
    return paths


def download_dataset_files(session, repo, files, out, revision="main", endpoint=DEFAULT_ENDPOINT, expected=None,
                           progress=True, attempts=5):
    """Dataset files, kept at their repository paths under out. expected: {file: (sha256 or None, bytes or None)}."""
    out, expected = Path(out), expected or {}
    paths = []
    for name in files:
        sha, size = expected.get(name, (None, None))
        url = hub_url(endpoint, repo, _repo_relative(name, repo), revision, repo_type="dataset")
        paths.append(download_file(session, url, out / name, sha, size, progress=progress, attempts=attempts))
    return paths


def hh_rlhf_files(splits=("train", "test")):
    return [f"{subset}/{split}.jsonl.gz" for subset in HH_RLHF_SUBSETS for split in splits]


# --- command line ---

def parse_sha256(items):
    """["FILE=HEX", …] → {FILE: hex}."""
    table = {}
    for item in items or []:
        name, _, digest = item.partition("=")
        if not name or not SHA256_RE.match(digest.lower()):
            raise SystemExit(f"download.py: --sha256 expects FILE=<64 hex digits>, got {item!r}")
        table[name] = digest.lower()
    return table


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--revision", default="main", help="branch, tag or commit")
    common.add_argument("--endpoint", default=None, help="hub URL (default: $HF_ENDPOINT or huggingface.co)")
    common.add_argument("--sha256", action="append", metavar="FILE=HEX", help="expected sha256 of a file")
    common.add_argument("--attempts", type=int, default=5, help="resumes after a cut-off stream, per file")
    common.add_argument("--retries", type=int, default=5, help="urllib3 retries per request (errors, 429/5xx)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", parents=[common], help="a model repository: config, tokenizer, weights")
    p.add_argument("repo", help="owner/name, e.g. openlm-research/open_llama_3b_v2")
    p = sub.add_parser("dataset", parents=[common], help="named files of a dataset repository")
    p.add_argument("repo")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("hh-rlhf", parents=[common], help=f"{HH_RLHF_REPO}: {', '.join(HH_RLHF_SUBSETS)}")
    p.add_argument("--splits", default="train,test", help="comma-separated: train, test")
    args = parser.parse_args(argv)

    endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    session = make_session(os.environ.get("HF_TOKEN") or None, retries=args.retries)
    sha256 = parse_sha256(args.sha256)
    progress = not args.no_progress
    try:
        if args.command == "model":
            return download_model(session, args.repo, args.out, args.revision, endpoint, sha256, progress,
                                  args.attempts)
        if args.command == "dataset":
            repo, files, expected = args.repo, args.files, {}
        else:
            splits = [s.strip() for s in args.splits.split(",") if s.strip()]
            if not splits or set(splits) - {"train", "test"}:
                raise SystemExit(f"download.py: --splits expects train and/or test, got {args.splits!r}")
            repo, files, expected = HH_RLHF_REPO, hh_rlhf_files(splits), dict(HH_RLHF_EXPECTED)
        for name, digest in sha256.items():
            expected[name] = (digest, expected.get(name, (None, None))[1])
        return download_dataset_files(session, repo, files, args.out, args.revision, endpoint, expected, progress,
                                      args.attempts)
    except ValueError as e:
        raise SystemExit(f"download.py: {e}") from None
    except requests.RequestException as e:
        raise SystemExit(f"download.py: {type(e).__name__}: {e}") from None


if __name__ == "__main__":
    main()
