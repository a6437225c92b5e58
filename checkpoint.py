"""
checkpoint.py: the files of a training run in out_dir, written so that nothing a user does loses a good checkpoint.
Not part of the paper; train.py and sample.py call it.

out_dir holds
  ckpt.pt             model, optimizer, RNG states, config, step, the data fingerprint and the tokenizer itself
  tokenizer.tiktoken  a copy of the checkpoint's tokenizer for other tools (sample.py reads the checkpoint's own)
  metrics.jsonl       one JSON record per logged step and per evaluation
  train.lock          exists while a train.py holds out_dir

What is guaranteed (each promise has a test in tests/test_checkpoint.py or tests/test_train.py):
  1. atomic: ckpt.pt is written to ckpt.pt.tmp, flushed to disk, then renamed over the old one; a kill at any
     moment leaves the old checkpoint or the new one. A failed write (disk full) removes the temp file, and a
     temp file left by kill -9 is removed by the next run that takes the lock.
  2. finite only: a checkpoint whose weights, optimizer moments or loss hold a NaN/inf is never written.
  3. one run per out_dir: train.lock is held with flock(2); a second train.py on the same out_dir stops with one
     line. The kernel drops the lock when its process dies, kill -9 included, so a killed run never blocks the next.
  4. the checkpoint carries its tokenizer and a fingerprint of its data; resuming with other data is refused.
  5. --overwrite=True changes nothing in out_dir until the new run writes its first checkpoint; only then are
     tokenizer.tiktoken and metrics.jsonl replaced. Resuming cuts metrics.jsonl back to the checkpoint's step.
Errors are CheckpointError with a one-line message meant for the user.

Simplifications: the lock is advisory (only train.py takes it) and POSIX-only (fcntl); on a network file
system it is as good as the file system's flock emulation.
"""
import atexit, errno, fcntl, hashlib, json, os, secrets, shutil, socket, time

import torch

LOCK, CKPT, TOKENIZER, METRICS = "train.lock", "ckpt.pt", "tokenizer.tiktoken", "metrics.jsonl"
KEYS = ("model", "model_args", "step", "best_val")   # what --resume needs (hf.py's import has no optimizer, rng)


class CheckpointError(ValueError):
    """A checkpoint or out_dir problem. The message is one line meant for the user."""


class NonFiniteError(CheckpointError):
    pass


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__


# ----------------------------------------------------------------------------- out_dir and its lock

def check_out_dir(out_dir: str) -> str:
    """The out_dir setting as a path ('~' expanded), checked before any work: a folder we can write, or a path
    where one can be made. Raises CheckpointError."""
    if not out_dir.strip():
        raise CheckpointError("--out_dir is empty")
    path = os.path.expanduser(out_dir)
    probe = path
    while not os.path.exists(probe):   # the nearest existing folder on the path is the one that must be writable
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe):
        raise CheckpointError(f"--out_dir={out_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out_dir={out_dir}: {probe} is not writable")
    return path


def lock_out_dir(out_dir: str):
    """Create out_dir if needed and take its lock for the life of this process; remove a ckpt.pt.tmp that a
    killed run left. Returns release(), also registered with atexit: it drops the lock and removes the folders
    that this call created if they are still empty (a run that stops on bad input leaves nothing behind)."""
    created, d = [], os.path.abspath(out_dir)
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create --out_dir={out_dir}: {e.strerror}") from None
    path = os.path.join(out_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"{out_dir} is in use by another train.py ({holder}); wait for it to end or "
                                  f"choose another --out_dir") from None
        try:   # the holder may have unlinked the file between our open and our flock: then lock the new file
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    tmp = os.path.join(out_dir, CKPT + ".tmp")
    if os.path.exists(tmp):   # half a checkpoint from a run killed while saving: never valid, nobody else writes it
        os.remove(tmp)

    def release():
        if fd in released:
            return
        released.add(fd)
        try:
            os.remove(path)   # before unlocking: whoever locks next finds the path gone and makes a fresh file
        except OSError:
            pass
        os.close(fd)
        for d in created:     # deepest first; rmdir refuses a folder that is not empty
            try:
                os.rmdir(d)
            except OSError:
                break

    released = set()
    atexit.register(release)
    return release


# ----------------------------------------------------------------------------- saving

def first_non_finite(tree, prefix: str = "") -> str | None:
    """Name of the first floating tensor (or float) holding a NaN/inf in a nested dict/list, else None."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif torch.is_tensor(tree):
        return prefix if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    elif isinstance(tree, float):
        return prefix if tree != tree or tree in (float("inf"), float("-inf")) else None
    else:
        return None
    for k, v in items:
        bad = first_non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad:
            return bad
    return None


def save(ckpt: dict, path: str) -> None:
    """Write ckpt atomically (temp file, fsync, rename). Refuses (NonFiniteError) if the weights, the optimizer
    state or ckpt['loss'] hold a NaN/inf; on a failed write removes the temp file and raises CheckpointError."""
    bad = first_non_finite({k: ckpt.get(k) for k in ("model", "optimizer", "loss")})
    if bad:
        raise NonFiniteError(f"{bad} is not finite")
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())   # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch's writer reports a failed write as a RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = e   # the OSError behind torch's RuntimeError, if any, has the errno
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            why = f"disk full ({free / 2**20:.0f} MiB free)"
        elif cause is not None:
            why = cause.strerror or _one_line(cause)
        else:
            why = _one_line(e)
        raise CheckpointError(f"cannot write checkpoint {path}: {why}; the temp file was removed") from None
    try:   # make the rename itself durable
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loading

def load(path: str, device="cpu") -> dict:
    """A train.py checkpoint (weights_only: a checkpoint cannot run code). Any unreadable, truncated or foreign
    file is a CheckpointError naming what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # truncated zip, random bytes, a pickle with code in it, ...
        raise CheckpointError(f"cannot load checkpoint {path}: {_one_line(e)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no 'model' and 'model_args' entries)")
    return ckpt


def check_resumable(ckpt: dict, path: str) -> None:
    missing = [k for k in KEYS if k not in ckpt]
    if missing or ("optimizer" in ckpt) != ("rng" in ckpt):
        raise CheckpointError(f"{path} cannot be resumed: it has no {', '.join(missing or ['optimizer', 'rng'])}")


def optimizer_state_for(state: dict, fp8: bool) -> dict:
    """The optimizer state of a checkpoint, as the optimizer of this run loads it. torch.optim.AdamW keeps each
    parameter's step as a tensor, fp8.AdamWBF16 as an int: resuming a BF16/FP32 run with --fp8=True (or back)
    converts it; the moments are cast by the optimizers' own load_state_dict."""
    if not fp8:
        return state   # AdamW accepts int steps
    conv = {i: {k: (int(v.item()) if k == "step" and torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in state["state"].items()}
    return dict(state, state=conv)


def tokenizer_text(ckpt: dict) -> str | None:
    return (ckpt.get("data") or {}).get("tokenizer")


# ----------------------------------------------------------------------------- data fingerprint

def data_fingerprint(meta: dict, tokenizer_path: str) -> dict:
    """What a checkpoint records about its data: the corpus name, its cache key (name, vocabulary size and a
    hash of the exact text), and the tokenizer file itself (a few hundred KB at most)."""
    text = open(tokenizer_path).read()
    return dict(name=meta["name"], key=meta.get("key"), vocab_size=meta["vocab_size"], tokenizer=text,
                tokenizer_sha256=hashlib.sha256(text.encode()).hexdigest())


def check_same_data(ckpt: dict, fp: dict, path: str, tokenizer_copy: str | None = None) -> None:
    """Refuse to resume on other data. A checkpoint without a fingerprint (hf.py's import, or from before
    fingerprints) is checked against the tokenizer.tiktoken beside it, its only record of its token ids."""
    saved = ckpt.get("data")
    if saved is None:
        if tokenizer_copy and os.path.exists(tokenizer_copy) and open(tokenizer_copy).read() != fp["tokenizer"]:
            raise CheckpointError(f"{tokenizer_copy} differs from the tokenizer built for this data (--data, "
                                  f"--vocab_size): the checkpoint's token ids would mean other text")
        return
    if saved["tokenizer_sha256"] != fp["tokenizer_sha256"] or saved.get("key") != fp["key"]:
        raise CheckpointError(f"{path} was trained on data {saved.get('key')} but this run's data is {fp['key']} "
                              f"(a different text or vocab_size gives a different tokenizer); resume with the "
                              f"same --data and --vocab_size, or start over with --overwrite=True")


# ----------------------------------------------------------------------------- the run's files

class RunFiles:
    """Metrics and checkpoints of one run, so that --overwrite=True touches nothing until the first save.
      fresh run (no ckpt.pt): metrics.jsonl is started afresh (a log without a checkpoint is an orphan);
      --overwrite=True over a ckpt.pt: records go to metrics.jsonl.RUN until the first checkpoint is written,
          then that file replaces metrics.jsonl and the tokenizer copy is replaced;
      resume: metrics.jsonl is cut back to the checkpoint's step (a kill -9 after a log line but before the
          next save would otherwise repeat those steps), a metrics.jsonl.RUN of the checkpoint's own run (killed
          between its rename steps) is completed, and other runs' leftovers are removed.
    enabled=False (data-parallel ranks other than 0) writes nothing."""

    def __init__(self, out_dir: str, tokenizer: str, run_id: str | None = None, resume_step: int | None = None,
                 enabled: bool = True):
        self.out_dir, self.tokenizer, self.enabled = out_dir, tokenizer, enabled
        self.run_id = run_id or secrets.token_hex(4)
        self.ckpt_path = os.path.join(out_dir, CKPT)
        self.last_saved = resume_step   # step of the checkpoint this run last wrote or resumed from
        main_log = os.path.join(out_dir, METRICS)
        self.metrics, self.pending = main_log, False
        if not enabled:
            return
        leftovers = [f for f in os.listdir(out_dir) if f.startswith(METRICS + ".")]
        if resume_step is not None:
            for f in leftovers:
                if f == f"{METRICS}.{self.run_id}":
                    os.replace(os.path.join(out_dir, f), main_log)
                else:
                    os.remove(os.path.join(out_dir, f))
            if os.path.exists(main_log):
                keep = []
                for line in open(main_log):
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            keep.append(line)
                    except (ValueError, KeyError, TypeError):   # half a line from a kill: drop it
                        pass
                _atomic_write_text(main_log, "".join(keep))
            self._write_tokenizer()
        elif os.path.exists(self.ckpt_path):   # --overwrite=True: the old run's files stay until our first save
            for f in leftovers:
                os.remove(os.path.join(out_dir, f))
            self.metrics, self.pending = f"{main_log}.{self.run_id}", True
        else:
            for f in leftovers + ([METRICS] if os.path.exists(main_log) else []):
                os.remove(os.path.join(out_dir, f))
            self._write_tokenizer()

    def _write_tokenizer(self):
        path = os.path.join(self.out_dir, TOKENIZER)
        if not os.path.exists(path) or open(path).read() != self.tokenizer:
            _atomic_write_text(path, self.tokenizer)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, ckpt: dict) -> None:
        """save() to out_dir/ckpt.pt with run_id; the first save of an --overwrite run then swaps in its files."""
        if not self.enabled:
            return
        save(dict(ckpt, run_id=self.run_id), self.ckpt_path)
        self.committed(ckpt["step"])

    def committed(self, step: int) -> None:
        """A checkpoint of `step` is now on disk (written by save, or as shards by parallel.save_checkpoint)."""
        if not self.enabled:
            return
        self.last_saved = step
        if self.pending:   # the commit point has passed: the old run's files are now the stale ones
            self._write_tokenizer()
            os.replace(self.metrics, os.path.join(self.out_dir, METRICS))
            self.metrics, self.pending = os.path.join(self.out_dir, METRICS), False

    def kept(self) -> str:
        """What is left in out_dir after a stop, for the error message."""
        if self.last_saved is not None:
            return f"the last good checkpoint (step {self.last_saved}) is kept in {self.ckpt_path}"
        if os.path.exists(self.ckpt_path):
            return f"this run saved nothing; {self.ckpt_path} from the earlier run is untouched"
        return "no checkpoint was written"
