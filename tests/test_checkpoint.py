"""Tests for checkpoint.py: every promise in its docstring, on tiny state dicts (train-level runs that exercise the
same code through train.py are in test_train.py)."""
import errno, json, os, signal, subprocess, sys, time

import pytest
import torch

import checkpoint as C
from fp8 import AdamWBF16


def tiny_ckpt(step=3, loss=2.5):
    torch.manual_seed(step)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(8, 8)
    opt.step()
    return dict(model={"w": p.detach().clone()}, optimizer=opt.state_dict(), model_args={"dim": 8}, config={},
                step=step, best_val=3.0, rng={}, loss=loss)


def one_line_error(fn, *args, match):
    with pytest.raises(C.CheckpointError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------- saving

@pytest.mark.parametrize("where", ["model", "optimizer", "loss"])
def test_non_finite_checkpoint_is_never_written(tmp_path, where):
    path = str(tmp_path / "ckpt.pt")
    C.save(tiny_ckpt(step=1), path)
    bad = tiny_ckpt(step=2)
    if where == "model":
        bad["model"]["w"][3, 4] = float("nan")
    elif where == "optimizer":
        bad["optimizer"]["state"][0]["exp_avg_sq"][0, 0] = float("inf")
    else:
        bad["loss"] = float("nan")
    one_line_error(C.save, bad, path, match="is not finite")
    assert C.load(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_is_atomic_and_loads_back(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ck = tiny_ckpt()
    C.save(ck, path)
    back = C.load(path)
    assert torch.equal(back["model"]["w"], ck["model"]["w"]) and back["step"] == 3
    assert os.listdir(tmp_path) == ["ckpt.pt"]   # no temp file left


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_failed_write_removes_temp_file_and_keeps_old(tmp_path, monkeypatch, err):
    # the disk fills up after 1000 bytes of the new checkpoint: torch's writer turns the OSError into a
    # RuntimeError from inline_container.cc; we name the cause and remove the partial temp file
    path = str(tmp_path / "ckpt.pt")
    C.save(tiny_ckpt(step=1), path)
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(err, os.strerror(err))
            return self.f.write(b)
        def __getattr__(self, k):
            return getattr(self.f, k)
        def __enter__(self):
            return self
        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(C, "open", lambda p, mode="r": Full(real_open(p, mode)), raising=False)
    msg = one_line_error(C.save, tiny_ckpt(step=2), path, match="cannot write checkpoint")
    assert ("disk full" in msg) if err == errno.ENOSPC else (os.strerror(errno.EIO) in msg), msg
    assert os.listdir(tmp_path) == ["ckpt.pt"] and C.load(path)["step"] == 1


def test_real_write_failure_in_a_subprocess(tmp_path):
    # a real failing write through torch's C++ writer: a file-size limit (EFBIG) instead of a full disk
    code = ("import resource, signal, sys, torch, checkpoint as C\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))\n"
            "try:\n"
            f"    C.save(dict(model={{'w': torch.randn(100000)}}), {str(tmp_path / 'ckpt.pt')!r})\n"
            "except C.CheckpointError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "cannot write checkpoint" in r.stdout and "File too large" in r.stdout, r.stdout + r.stderr
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- loading

def test_load_errors_are_one_line(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    one_line_error(C.load, path, match="no checkpoint at")
    C.save(tiny_ckpt(), path)
    good = open(path, "rb").read()
    open(path, "wb").write(good[:len(good) // 2])
    one_line_error(C.load, path, match="cannot load checkpoint")         # truncated
    open(path, "wb").write(os.urandom(5000))
    one_line_error(C.load, path, match="cannot load checkpoint")         # random bytes
    torch.save({"a": 1}, path)
    one_line_error(C.load, path, match="not a train.py checkpoint")      # someone else's file
    torch.save(dict(model={}, model_args={}), path)
    one_line_error(C.check_resumable, C.load(path), path, match="cannot be resumed: it has no step, best_val")
    C.check_resumable(dict(model={}, model_args={}, step=0, best_val=1.0), path)   # weights only: hf.py's import


def test_fp32_optimizer_state_resumes_under_fp8_adamw():
    # torch's AdamW stores step as a tensor, AdamWBF16 as an int (its update used to raise a TypeError)
    ck = tiny_ckpt()
    p = torch.nn.Parameter(ck["model"]["w"].clone())
    opt = AdamWBF16([p], lr=1e-3)
    opt.load_state_dict(C.optimizer_state_for(ck["optimizer"], fp8=True))
    p.grad = torch.randn(8, 8)
    opt.step()
    assert opt.state[p]["step"] == 2 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    back = torch.optim.AdamW([p], lr=1e-3)   # and back: AdamW accepts the int step
    back.load_state_dict(C.optimizer_state_for(opt.state_dict(), fp8=False))
    back.step()


def test_data_fingerprint_mismatch_is_refused(tmp_path):
    (tmp_path / "a.tiktoken").write_text("YQ== 0\n")
    (tmp_path / "b.tiktoken").write_text("Yg== 0\n")
    fa = C.data_fingerprint(dict(name="a", key="a-v300-123", vocab_size=300), str(tmp_path / "a.tiktoken"))
    fb = C.data_fingerprint(dict(name="b", key="b-v300-456", vocab_size=300), str(tmp_path / "b.tiktoken"))
    C.check_same_data(dict(data=fa), fa, "ckpt.pt")
    C.check_same_data({}, fb, "ckpt.pt")   # no fingerprint and no tokenizer copy: nothing to compare
    C.check_same_data({}, fa, "ckpt.pt", str(tmp_path / "a.tiktoken"))   # no fingerprint: the copy beside it
    one_line_error(C.check_same_data, {}, fb, "ckpt.pt", str(tmp_path / "a.tiktoken"), match="differs from the tokenizer")
    one_line_error(C.check_same_data, dict(data=fa), fb, "ckpt.pt", match="trained on data a-v300-123")
    assert C.tokenizer_text(dict(data=fa)) == "YQ== 0\n"


# ----------------------------------------------------------------------------- out_dir, lock

def test_out_dir_checks(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    one_line_error(C.check_out_dir, str(tmp_path / "f"), match="is a file")
    one_line_error(C.check_out_dir, str(tmp_path / "f" / "sub"), match="is a file")
    one_line_error(C.check_out_dir, " ", match="empty")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert C.check_out_dir("~/runs/x") == str(tmp_path / "runs" / "x")
    if os.geteuid() != 0:   # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        one_line_error(C.check_out_dir, str(tmp_path / "ro" / "x"), match="not writable")


def test_lock_refuses_a_second_holder_and_cleans_up(tmp_path):
    out = str(tmp_path / "a" / "out")
    release = C.lock_out_dir(out)
    msg = one_line_error(C.lock_out_dir, out, match="is in use by another train.py")
    assert f"pid {os.getpid()}" in msg
    release()
    assert not os.path.exists(tmp_path / "a")   # the folders it made, still empty, are gone
    release2 = C.lock_out_dir(out)
    open(os.path.join(out, "ckpt.pt.tmp"), "wb").write(b"half")
    release2()
    open(os.path.join(out, "ckpt.pt"), "wb").write(b"x")
    C.lock_out_dir(out)()
    assert os.listdir(out) == ["ckpt.pt"]   # not removed: it holds a file
    open(os.path.join(out, "ckpt.pt.tmp"), "wb").write(b"half a checkpoint from a kill -9")
    C.lock_out_dir(out)()
    assert os.listdir(out) == ["ckpt.pt"]   # the stale temp file is removed by the next lock holder


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    out = str(tmp_path / "out")
    code = f"import checkpoint as C, time; C.lock_out_dir({out!r}); print('locked', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline().strip() == "locked"
    one_line_error(C.lock_out_dir, out, match=f"pid {p.pid}")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(os.path.join(out, "train.lock"))   # the file stays, the lock does not
    C.lock_out_dir(out)()


# ----------------------------------------------------------------------------- the run's files

def rows(path):
    return [json.loads(l) for l in open(path)]


def test_overwrite_touches_nothing_until_the_first_save(tmp_path):
    out = str(tmp_path)
    old = C.RunFiles(out, "old tokenizer")
    old.log(dict(step=1, loss=3.0))
    old.save(tiny_ckpt(step=1))
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    new = C.RunFiles(out, "new tokenizer")   # --overwrite=True
    new.log(dict(step=1, loss=9.0))
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before   # a kill here loses nothing
    assert new.kept() == f"this run saved nothing; {os.path.join(out, 'ckpt.pt')} from the earlier run is untouched"
    new.save(tiny_ckpt(step=1))
    assert open(os.path.join(out, "tokenizer.tiktoken")).read() == "new tokenizer"
    assert rows(os.path.join(out, "metrics.jsonl")) == [dict(step=1, loss=9.0)]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "tokenizer.tiktoken"]
    assert C.load(os.path.join(out, "ckpt.pt"))["run_id"] == new.run_id


def test_resume_cuts_metrics_back_and_finishes_an_interrupted_commit(tmp_path):
    out = str(tmp_path)
    run = C.RunFiles(out, "tok")
    for s in (1, 2, 3, 4, 5):
        run.log(dict(step=s, loss=1.0))
    run.save(tiny_ckpt(step=3))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')   # kill -9 in the middle of a line
    C.RunFiles(out, "tok", run_id=run.run_id, resume_step=3)
    assert [r["step"] for r in rows(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    # an --overwrite run killed between writing its first checkpoint and renaming its log: resume completes it
    new = C.RunFiles(out, "tok2")
    new.log(dict(step=1, loss=7.0))
    C.save(dict(tiny_ckpt(step=1), run_id=new.run_id), os.path.join(out, "ckpt.pt"))
    C.RunFiles(out, "tok2", run_id=new.run_id, resume_step=1)
    assert rows(os.path.join(out, "metrics.jsonl")) == [dict(step=1, loss=7.0)]
    assert open(os.path.join(out, "tokenizer.tiktoken")).read() == "tok2"
    # a run killed before its first save leaves a log of its own; resuming the checkpoint's run removes it
    C.RunFiles(out, "tok3").log(dict(step=1, loss=5.0))
    C.RunFiles(out, "tok2", run_id=new.run_id, resume_step=1)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "tokenizer.tiktoken"]


def test_kept_message_never_claims_a_checkpoint_that_does_not_exist(tmp_path):
    assert C.RunFiles(str(tmp_path), "tok").kept() == "no checkpoint was written"
    assert "step 7" in C.RunFiles(str(tmp_path), "tok", resume_step=7).kept()
