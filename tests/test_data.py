"""Tests for data.py: text cleaning, the BPE trainer against a naive reference and against tiktoken, exact
round trips, the cached preparation of the real corpus, batches, and every bad-input error."""
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import regex
import tiktoken.load
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sample_text():  # ~60 KB of real play text: enough pairs for a 512-token vocabulary
    return data.markdown_to_play(data.shakespeare_plays()["tragedies/macbeth.md"])[:60_000]


@pytest.fixture(scope="module")
def small_tok(sample_text, tmp_path_factory):
    merges = data.train_bpe([sample_text], 512)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.tiktoken")
    data.save_tokenizer(data.merges_to_ranks(merges), path)
    return merges, path, data.load_tokenizer(path)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):  # the whole default corpus at a 2048 vocabulary: ~5 s on 2 cores
    return data.prepare(None, 2048, cache_dir=str(tmp_path_factory.mktemp("cache")))


def random_unicode(rng: random.Random, n: int) -> str:
    """Text that stresses byte-level BPE: multi-byte UTF-8, astral code points, combining marks, controls."""
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1F6FF),
             (0x0600, 0x06FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        c = rng.randint(lo, hi)
        out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "?")  # lone surrogates are not encodable text
        if rng.random() < 0.05:
            out.append(rng.choice(["\r\n", "\u200d", "\U0001F3FD", "  ", "'ll", "123456", "\t"]))
    return "".join(out)


# ----------------------------------------------------------------------------- text cleaning

def test_markdown_to_play():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n"
          "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \n_\\[Aside]_  \nNay, answer me:  \n'\\--stand.\n\n"
          "*Sound a horn.*\n\n_Exit_\n")
    want = ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
            "BERNARDO:\nWho's there?\n\nFRANCISCO:\n[Aside]\nNay, answer me:\n'--stand.\n\n[Sound a horn.]\n\n[Exit]\n")
    assert data.markdown_to_play(md) == want


# ----------------------------------------------------------------------------- BPE

def naive_bpe(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Reference: recount every pair of every chunk from scratch at each step; max count, then smallest pair."""
    words = [list(c.encode()) for c in regex.findall(data.PAT_STR, text)]
    merges = []
    for r in range(n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts or max(counts.values()) < 2:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words = [data._merge(w, best, 256 + r) for w in words]
    return merges


def test_incremental_bpe_matches_naive(sample_text):
    text = sample_text[:8000]
    assert data.train_bpe([text], 257 + 150) == naive_bpe(text, 150)


def test_bpe_stops_when_no_pair_repeats():
    merges = data.train_bpe(["abcabc"], 1000)  # one chunk: ab (x2), then abc (x2); abc+abc occurs once: stop
    assert len(merges) == 2 and data.merges_to_ranks(merges)[b"abc"] == 257


def test_training_is_deterministic(sample_text, small_tok, tmp_path):
    merges, path, _ = small_tok
    again = data.train_bpe([sample_text], 512)
    data.save_tokenizer(data.merges_to_ranks(again), str(tmp_path / "again.tiktoken"))
    assert open(path, "rb").read() == open(tmp_path / "again.tiktoken", "rb").read()


def test_tiktoken_matches_our_bpe(sample_text, small_tok):
    # tiktoken merges by the rank of the joined bytes; ours replays merges in learned order: must be identical.
    merges, _, enc = small_tok
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    start = rng.randrange(len(sample_text) - 5000)
    for text in (sample_text[start:start + 5000], random_unicode(rng, 500)):
        assert enc.encode_ordinary(text) == data.bpe_encode_ref(text, merges), f"seed {seed}"


def test_round_trip_arbitrary_unicode(small_tok):
    _, _, enc = small_tok
    seed = random.randrange(2**32)  # fresh text each run; the seed in the message reproduces a failure
    rng = random.Random(seed)
    for n in (0, 1, 7, 300, 3000):
        text = random_unicode(rng, n)
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text, f"seed {seed}, n {n}"
        assert max(ids, default=0) < enc.n_vocab - 1  # ordinary text never produces <|endoftext|>
    assert enc.decode(enc.encode("a" + data.EOT + "b", allowed_special="all")) == "a" + data.EOT + "b"


def test_tokenizer_file_is_tiktoken_format(small_tok, monkeypatch):
    merges, path, enc = small_tok
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" disables tiktoken's path-keyed file cache
    assert tiktoken.load.load_tiktoken_bpe(path) == data.merges_to_ranks(merges)
    assert enc.n_vocab == 512 and enc.eot_token == 511


# ----------------------------------------------------------------------------- preparation

def test_shakespeare_preparation(shakespeare):
    m = shakespeare
    enc = data.load_tokenizer(m["tokenizer"])
    assert m["vocab_size"] == enc.n_vocab == 2048 and m["eot_token"] == 2047
    train, val = data.load_tokens(m["train_bin"]), data.load_tokens(m["val_bin"])
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert (len(train), len(val)) == (m["train_tokens"], m["val_tokens"])
    assert (m["train_docs"], m["val_docs"]) == (35, 3)
    train_text, val_text = enc.decode(train.tolist()), enc.decode(val.tolist())
    assert train_text.count(data.EOT) == 35 and val_text.count(data.EOT) == 3  # one before each play
    assert len(train_text.replace(data.EOT, "").encode()) == m["train_bytes"]
    assert len(val_text.replace(data.EOT, "").encode()) == m["val_bytes"]
    for bad in ("#", "**", "_", "\\"):  # all Markdown is gone
        assert bad not in train_text and bad not in val_text, bad
    speakers = re.findall(r"^([A-Z][A-Z' ]+):$", train_text, flags=re.M)
    assert len(speakers) > 20_000 and "HAMLET" in speakers
    titles = re.findall(f"{re.escape(data.EOT)}(.*)\n", val_text)
    assert titles == ["Twelfth Night", "Richard II", "Othello"]  # whole held-out plays...
    for title in titles:  # ...and none of them is in the training split
        assert f"{data.EOT}{title}\n" not in train_text
    assert "IAGO:" in val_text and "IAGO:" not in train_text
    assert 2.5 < m["train_bytes"] / m["train_tokens"] < 3.5  # measured 2.98 at this vocabulary


def test_preparation_is_cached(shakespeare):
    cache = os.path.dirname(os.path.dirname(shakespeare["train_bin"]))
    mtime = os.path.getmtime(shakespeare["train_bin"])
    t0 = time.time()
    again = data.prepare(None, 2048, cache_dir=cache)
    assert again == shakespeare and os.path.getmtime(again["train_bin"]) == mtime
    assert time.time() - t0 < 3, "a cached call should only read and hash the text, not retrain"
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]  # no temp dirs left behind


def test_user_text_file(sample_text, tmp_path):
    path = tmp_path / "my text.txt"
    path.write_text(sample_text[:20_000] + " \u00e9t\u00e9 \U0001F600\n", encoding="utf-8")
    m = data.prepare(str(path), 400, cache_dir=str(tmp_path / "c"))
    text = path.read_text(encoding="utf-8")
    enc = data.load_tokenizer(m["tokenizer"])
    train = enc.decode(data.load_tokens(m["train_bin"]).tolist())   # no separators in a user file
    val = enc.decode(data.load_tokens(m["val_bin"]).tolist())
    assert train + val == text and train.endswith("\n") and not val[0].isspace()   # cut at a line start
    assert 0.9 <= len(train.encode()) / len(text.encode()) < 0.95                      # the last ~10% held out
    assert m["val_bytes"] == len(val.encode()) and m["name"] == "my_text" and m["train_docs"] == 1
    path.write_text(text + "more", encoding="utf-8")  # changed content -> a new cache entry
    assert data.prepare(str(path), 400, cache_dir=str(tmp_path / "c"))["train_bin"] != m["train_bin"]


def test_blockwise_encoding_equals_encoding_the_whole_text(sample_text, tmp_path, monkeypatch):
    # a big corpus is read in blocks cut at line starts; the ids must be exactly those of the whole text
    path = tmp_path / "t.txt"
    text = sample_text + "  \n\n!\n\n  indented\n" * 20 + sample_text[:5000]   # line breaks in every context
    path.write_text(text, encoding="utf-8")
    whole = data.prepare(str(path), 400, cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(data, "BLOCK_BYTES", 1000)
    blocks = data.prepare(str(path), 400, cache_dir=str(tmp_path / "b"))
    assert len(list(data.read_blocks((str(path), 0, len(text.encode()))))) > 50
    enc = data.load_tokenizer(whole["tokenizer"])
    for split in ("train", "val"):
        ids = data.load_tokens(blocks[f"{split}_bin"]).tolist()
        assert ids == data.load_tokens(whole[f"{split}_bin"]).tolist()
        assert ids == enc.encode_ordinary(enc.decode(ids))   # = one encode of the split's whole text


def test_folder_with_validation_file_and_story_separators(tmp_path):
    folder = tmp_path / "stories"
    (folder / "more").mkdir(parents=True)
    rng = random.Random(0)
    words = "the cat sat on a mat and then a dog ran far away to see the sun".split()

    def stories(n):
        return "".join(" ".join(rng.choice(words) for _ in range(40)).capitalize() + ".\n<|endoftext|>\n"
                       for _ in range(n))
    a, b, v = stories(30), stories(20), stories(10)
    (folder / "a.txt").write_text(a)
    (folder / "more" / "b.txt").write_text(b)
    (folder / "TinyStories-valid.txt").write_text(v)
    (folder / "notes.md").write_text("not a .txt file: ignored")
    m = data.prepare(str(folder), 300, cache_dir=str(tmp_path / "c"))
    enc = data.load_tokenizer(m["tokenizer"])
    train, val = data.load_tokens(m["train_bin"]).tolist(), data.load_tokens(m["val_bin"]).tolist()
    # each file is a document preceded by <|endoftext|>, and each literal separator is the special token
    assert enc.decode(train) == data.EOT + a + data.EOT + b and enc.decode(val) == data.EOT + v
    assert train.count(enc.eot_token) == 2 + 50 and val.count(enc.eot_token) == 1 + 10
    assert m["train_docs"] == 52 and m["val_docs"] == 11
    assert m["val_bytes"] == len(v.encode()) - 10 * len(data.EOT)   # separators have no bytes in bits/byte
    # a folder without a validation file holds out its last ~10%; an empty folder is one clear line
    (folder / "TinyStories-valid.txt").unlink()
    m2 = data.prepare(str(folder), 300, cache_dir=str(tmp_path / "c"))
    assert 0.08 < m2["val_bytes"] / (m2["train_bytes"] + m2["val_bytes"]) < 0.12
    (tmp_path / "none").mkdir()
    with pytest.raises(data.DataError, match="no .txt files"):
        data.prepare(str(tmp_path / "none"), 300, cache_dir=str(tmp_path / "c"))


def test_tokenizer_trains_on_a_bounded_sample_spread_over_the_corpus(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i:06d} " + "word " * 10 + "\n" for i in range(40_000)]   # ~2.4 MB, numbered lines
    path.write_text("".join(lines))
    size = path.stat().st_size
    docs = data.bpe_sample([(str(path), 0, size)], limit=64 * 1024)
    sampled = "".join(docs)
    assert 60_000 < len(sampled.encode()) <= 64 * 1024 + 64 * 80       # the bound, + at most a line per piece
    numbers = [int(x) for x in re.findall(r"line (\d{6})", sampled)]
    assert min(numbers) < 1000 and max(numbers) > 39_000                # from the start to the end of the file
    assert all(d.endswith("\n") and d.startswith("line") for d in docs)  # whole lines
    assert data.bpe_sample([(str(path), 0, size)], limit=10 * size) == ["".join(lines)]   # small: everything


def test_token_dtype():
    assert data.token_dtype(2**16) == np.uint16 and data.token_dtype(2**16 + 1) == np.uint32


# ----------------------------------------------------------------------------- batches and metrics

def test_get_batch(tmp_path):
    ids = np.random.default_rng(0).integers(0, 100_000, 1000).astype(np.uint32)  # ids above 2^16 survive
    path = str(tmp_path / "t.uint32.bin")
    ids.tofile(path)
    B, T = 4, 16
    x, y = data.get_batch(path, B, T, torch.Generator().manual_seed(1), "cpu")
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row in x:  # every row is a real window of the file
        starts = np.flatnonzero(ids[:-T] == row[0].item())
        assert any(np.array_equal(ids[s:s + T], row.numpy()) for s in starts)
    x2, y2 = data.get_batch(data.load_tokens(path), B, T, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same generator state -> same batch, path or array
    x3, _ = data.get_batch(path, B, T, torch.Generator().manual_seed(2), "cpu")
    assert not torch.equal(x, x3)
    x4, y4 = data.get_batch(ids[:T + 1], 2, T, torch.Generator(), "cpu")  # exactly one window exists
    assert torch.equal(x4[0], torch.from_numpy(ids[:T].astype(np.int64))) and y4[1, -1].item() == ids[T]


def test_bits_per_byte():
    # A uniform guess over 256 byte tokens costs 8 bits per byte; so does a uniform guess over 2^16 two-byte
    # tokens: bits per byte does not depend on how the text was cut into tokens, loss per token does.
    assert data.bits_per_byte(math.log(256), 1000, 1000) == pytest.approx(8.0, rel=1e-12)
    assert data.bits_per_byte(math.log(2**16), 500, 1000) == pytest.approx(8.0, rel=1e-12)


# ----------------------------------------------------------------------------- bad input

def _error(fn, *args, match, **kw):
    with pytest.raises(data.DataError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)  # one line


def test_bad_inputs(tmp_path):
    c = str(tmp_path / "c")
    _error(data.prepare, str(tmp_path / "nope.txt"), 512, c, match="not found")
    (tmp_path / "empty.txt").write_bytes(b"")
    _error(data.prepare, str(tmp_path / "empty.txt"), 512, c, match="empty")
    (tmp_path / "blank.txt").write_bytes(b" \n\n ")
    _error(data.prepare, str(tmp_path / "blank.txt"), 512, c, match="empty")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    _error(data.prepare, str(tmp_path / "latin1.txt"), 512, c, match="not UTF-8.*offset 3")
    (tmp_path / "tiny.txt").write_text("x")  # its last 10% is empty
    _error(data.prepare, str(tmp_path / "tiny.txt"), 512, c, match="too short")
    _error(data.prepare, None, 100, c, match="vocab_size")
    _error(data.check_enough, 1000, 4, 256, match=r"train split has 1000 tokens.*4x256\+1 = 1025")
    data.check_enough(1025, 4, 256)  # exactly one batch is enough
    _error(data.get_batch, np.zeros(8, np.uint16), 2, 8, torch.Generator(), "cpu", match="too few")
    _error(data.load_tokens, str(tmp_path / "tiny.txt"), match="not a token file")


def test_cli_errors_exit_2(tmp_path):
    for args in (["--data=" + str(tmp_path / "missing.txt")], ["--vocab_size=big"], ["oops"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


# ----------------------------------------------------------------------------- downloads (no internet here: a local server)

class RangeServer:
    """http.server on 127.0.0.1 serving one payload, honouring 'Range: bytes=N-' (http.server does not), and
    optionally cutting the first response short (declared length, fewer bytes sent) to simulate a dropped link."""

    def __init__(self, payload: bytes, cut_first: int | None = None, sha_header: str | None = None):
        import http.server, threading
        self.payload, self.requests, server = payload, [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                body = server.payload[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if sha_header:
                    self.send_header("X-Linked-Etag", f'"{sha_header}"')
                self.end_headers()
                if cut_first is not None and len(server.requests) == 1:
                    body = body[:cut_first]
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/corpus.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_resumes_and_verifies(tmp_path):
    payload = os.urandom(300_000)
    sha = __import__("hashlib").sha256(payload).hexdigest()
    dest = str(tmp_path / "d" / "corpus.txt")
    with RangeServer(payload, cut_first=100_000, sha_header=sha) as srv:
        with pytest.raises(data.DataError, match="run the same command again to resume"):
            data.download(srv.url, dest)           # the link drops after 100 KB: the part file is kept
        assert os.path.getsize(dest + ".part") == 100_000 and not os.path.exists(dest)
        assert data.download(srv.url, dest) == dest  # resumes from byte 100,000, checks the server's sha256
        assert srv.requests == [None, "bytes=100000-"]
    assert open(dest, "rb").read() == payload and not os.path.exists(dest + ".part")
    assert open(dest + ".sha256").read().split()[0] == sha
    assert data.download("http://127.0.0.1:9/never", dest, sha) == dest   # present and verified: no request


def test_download_checksum_mismatch_and_bad_urls(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world\n" * 1000)
    good = __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    dest = str(tmp_path / "out.txt")
    with pytest.raises(data.DataError, match="checksum mismatch.*partial file was removed"):
        data.download(src.as_uri(), dest, sha256="0" * 64)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    assert data.download(src.as_uri(), dest, sha256=good) == dest          # file:// URLs work too
    with RangeServer(b"x" * 10, sha_header="f" * 64) as srv:               # the server's sha256 is checked
        with pytest.raises(data.DataError, match="checksum mismatch"):
            data.download(srv.url, str(tmp_path / "x.txt"))
    _error(data.download, (tmp_path / "missing.txt").as_uri(), str(tmp_path / "m.txt"), match="download failed")


def test_cli_prepare_downloads_then_tokenizes(sample_text, tmp_path):
    payload = sample_text[:30_000].encode()
    with RangeServer(payload) as srv:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "prepare", srv.url,
                            f"--dest={tmp_path / 'dl'}", "--vocab_size=300", f"--cache_dir={tmp_path / 'c'}"],
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert open(tmp_path / "dl" / "corpus.txt", "rb").read() == payload
    assert "train on it: python train.py --config gpu --data=" in r.stdout and "tokens" in r.stdout
    for args in (["prepare"], ["prepare", "nosuchcorpus", "--dest=" + str(tmp_path / "x")]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
