"""Output directories: nothing the project did not write is deleted or mixed into; writes are staged; leftovers of a
killed run are cleaned by the next one (`digit.utils.outputs`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS, write_image_folder
from digit.cli import main
from digit.data.tokens import read_token_dir, write_token_dir
from digit.errors import DigitError
from digit.utils.outputs import MARKER, check_output_dir, claim_dir, output_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny random-init discriminative tokenizer (from random centroids: no fitting)."""
    d = tmp_path_factory.mktemp("tok")
    np.save(d / "km.npy", np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    argv = ["tokenizer", "from-centroids", "--centroids", str(d / "km.npy"), "--encoder", TINY_VIT,
            "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS), "--random-init", "--image-size", str(TINY_IMAGE_SIZE),
            "--layer", "1", "--out", str(d / "tokenizer")]  # fmt: skip
    assert main(argv) == 0
    return d / "tokenizer"


def tokenize(tok: Path, data: Path, out, *extra: str) -> int:
    return main(["tokenize", "--tokenizer", str(tok), "--data", str(data), "--workers", "0", *extra, "--out", str(out)])


def one_line_error(capsys) -> str:
    """The one `digit CMD: error: ...` line (progress bars of earlier calls share stderr)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("digit ")]
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_tokenize_refuses_a_foreign_folder_unless_overwrite(tokenizer_dir, tmp_path, capsys):
    data = write_image_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert tokenize(tokenizer_dir, data, out) == 2
    err = one_line_error(capsys)
    assert "--overwrite" in err and str(out) in err
    assert (out / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(out)) == ["thesis.tex"]
    assert tokenize(tokenizer_dir, data, out, "--overwrite") == 0  # asked for: replaced
    assert not (out / "thesis.tex").exists() and len(read_token_dir(out)) == 4


def test_own_output_is_replaced_but_not_once_a_user_file_is_in_it(tokenizer_dir, tmp_path, capsys):
    data = write_image_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "tok"
    assert tokenize(tokenizer_dir, data, out) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "tokenize" and marker["files"] == ["labels.npy", "meta.json", "tokens.npy"]
    assert tokenize(tokenizer_dir, data, out, "--limit", "3") == 0  # this command's own output: replaced
    limited = read_token_dir(out)
    assert len(limited) == 3 and sorted(set(np.asarray(limited.labels).tolist())) == [0, 1]  # spread: both classes
    assert limited.meta["source"]["limit"] == {"n": 3, "rule": "spread"}  # so prefix alignment can tell
    (out / "notes.txt").write_text("mine")
    assert tokenize(tokenizer_dir, data, out) == 2
    assert "not an earlier `digit tokenize` output" in one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine" and len(read_token_dir(out)) == 3
    # a token directory of another command (here the library's own kind) is not this command's
    write_token_dir(tmp_path / "lib", np.zeros((2, 4, 4), np.int64), None, vocab_size=8)
    assert tokenize(tokenizer_dir, data, tmp_path / "lib") == 2


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_an_input_is_refused_even_with_overwrite(tokenizer_dir, tmp_path, capsys, where):
    data = write_image_folder(tmp_path / "top" / "imgs", n_per_class=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = {"same": data, "inside": data / "tokens", "contains": tmp_path / "top"}[where]
    assert tokenize(tokenizer_dir, data, out, "--overwrite") == 2
    err = one_line_error(capsys)
    assert {"same": " is the input ", "inside": " is inside the input ", "contains": " contains the input "}[
        where
    ] in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # the images are all there


def test_out_dot_and_working_directory_are_refused(tokenizer_dir, tmp_path, capsys, monkeypatch):
    data = write_image_folder(tmp_path / "imgs", n_per_class=2)
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path / "a")):
        assert tokenize(tokenizer_dir, data, out, "--overwrite") == 2
        assert "is the working directory or contains it" in one_line_error(capsys)
    assert (work / "keep.txt").read_text() == "x"
    assert tokenize(tokenizer_dir, data, "sub") == 0 and len(read_token_dir(work / "sub")) == 4


def test_zero_usable_images_writes_nothing(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        (bad / c / "x.png").write_bytes(b"not a png")
    assert tokenize(tokenizer_dir, bad, tmp_path / "tok") == 2
    err = one_line_error(capsys)
    assert "no usable images" in err and "skipped 2 file(s)" in err and not (tmp_path / "tok").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tok")]  # no staging left either


def _train_tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    toks = write_token_dir(tmp_path / "toks", rng.integers(0, 16, (8, 2, 2)), np.arange(8) % 2, vocab_size=16,
                           class_names=["a", "b"])  # fmt: skip
    run = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--no-progress", "--tokens", str(toks), "--class-cond", "--steps", "1",
            "--batch-size", "4", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    return toks, run


def test_sample_refuses_foreign_and_overlapping_outputs(tmp_path, capsys):
    toks, run = _train_tiny_run(tmp_path)
    out = tmp_path / "samples"
    out.mkdir()
    (out / "a.txt").write_text("a")
    sample = ["sample", "--run", str(run), "-n", "2", "--device", "cpu"]
    assert main([*sample, "--out", str(out)]) == 2 and "--overwrite" in one_line_error(capsys)
    assert os.listdir(out) == ["a.txt"]
    assert main([*sample, "--out", str(run / "s"), "--overwrite"]) == 2 and "inside the input" in one_line_error(capsys)
    assert (run / "model.safetensors").is_file()
    assert main([*sample, "--out", str(tmp_path / "s2")]) == 0 and main([*sample, "--out", str(tmp_path / "s2")]) == 0
    assert len(read_token_dir(tmp_path / "s2")) == 2


def test_run_directories_refuse_foreign_folders_and_overlaps(tmp_path, capsys):
    toks, run = _train_tiny_run(tmp_path)
    assert json.loads((run / MARKER).read_text())["kind"] == "run"
    base = ["train", "--model", "tiny", "--no-progress", "--tokens", str(toks), "--class-cond", "--steps", "1",
            "--batch-size", "4"]  # fmt: skip
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "me.jpg").write_bytes(b"x")
    assert main([*base, "--out", str(foreign)]) == 2 and "not a digit run directory" in one_line_error(capsys)
    assert sorted(os.listdir(foreign)) == ["me.jpg"]
    assert main([*base, "--out", str(toks / "run")]) == 2 and "inside the input" in one_line_error(capsys)
    assert not (toks / "run").exists()
    assert main([*base, "--out", str(run)]) == 2 and "--resume" in one_line_error(capsys)  # today's rule, kept
    # a run written before markers existed is still ours
    (run / MARKER).unlink()
    assert main([*base, "--steps", "2", "--resume", "--out", str(run)]) == 0


def _killed(code: str) -> None:
    """Run ``code`` in a child that kills itself with SIGKILL mid-write (a crash, not a clean exit)."""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tokenizer_dir, tmp_path):
    data = write_image_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "tok"
    _killed(
        "import os\nfrom digit.utils.outputs import output_dir\nfrom digit.utils.io import atomic_write\n"
        f"t = output_dir({str(out)!r}, kind='tokenize').begin()\n(t / 'tokens.npy').write_bytes(b'half')\n"
        f"atomic_write({str(tmp_path / 'notes.json')!r}, lambda p: (p.write_bytes(b'half'), os.kill(os.getpid(), 9)))"
    )
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(left) == 2 and any(n.startswith(".tok.pid") for n in left) and any(".notes.json.pid" in n for n in left)
    assert tokenize(tokenizer_dir, data, out) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")] and len(read_token_dir(out)) == 4


def test_temp_files_left_in_a_run_directory_are_removed_on_resume(tmp_path):
    toks, run = _train_tiny_run(tmp_path)
    _killed(
        "import os\nfrom digit.utils.io import atomic_write\n"
        f"atomic_write({str(run / 'model.safetensors')!r}, lambda p: (p.write_bytes(b'x'), os.kill(os.getpid(), 9)))"
    )
    assert len([p for p in run.iterdir() if p.name.endswith(".tmp")]) == 1
    argv = ["train", "--model", "tiny", "--no-progress", "--tokens", str(toks), "--class-cond", "--steps", "2",
            "--batch-size", "4", "--resume", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_live_processes_temps_are_kept_and_an_interrupted_replace_is_restored(tmp_path):
    live = tmp_path / f".x.pid{os.getppid()}.abc.tmp"  # the parent is alive: not ours to remove
    live.write_text("busy")
    check_output_dir(tmp_path / "x", kind="k")
    assert live.exists()
    with output_dir(tmp_path / "out", kind="k").stage() as t:
        (t / "a.txt").write_text("v1")
    os.replace(tmp_path / "out", tmp_path / ".out.old")  # killed between replace_dir's two renames
    check_output_dir(tmp_path / "out", kind="k")
    assert (tmp_path / "out" / "a.txt").read_text() == "v1" and not (tmp_path / ".out.old").exists()
    with pytest.raises(RuntimeError), output_dir(tmp_path / "out", kind="k").stage() as t:
        (t / "a.txt").write_text("v2")
        raise RuntimeError("failed half way")
    assert (tmp_path / "out" / "a.txt").read_text() == "v1"  # nothing published, staging removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    with pytest.raises(DigitError, match="not a digit recipe directory"):
        claim_dir(tmp_path / "out", kind="recipe")


def test_other_directory_writers_refuse_foreign_folders(tmp_path, capsys):
    foreign, inp = tmp_path / "f", tmp_path / "in"
    foreign.mkdir()
    inp.mkdir()
    (foreign / "x.txt").write_text("x")
    km = inp / "km.npy"
    np.save(km, np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
    cmds = [
        ["tokenizer", "from-centroids", "--centroids", str(km), "--encoder", TINY_VIT,
         "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS), "--random-init", "--image-size", "56", "--out", str(foreign)],
        ["vq", "reconstruct", "--vq", str(inp), "--data", str(inp), "--out", str(foreign)],
        ["recipe", "ship", "--recipe", str(inp), "--out", str(foreign)],
        ["recipe", "cifar10", "--data", str(km), "--out", str(foreign)],
        ["demo", "--out", str(foreign)],
        ["convert", "llamagen", "--gpt", str(km), "--out", str(foreign)],
    ]  # fmt: skip
    for argv in cmds:
        assert main(argv) == 2, argv
        err = one_line_error(capsys)
        assert str(foreign) in err and ("--overwrite" in err or "choose a new folder" in err), (argv, err)
        assert os.listdir(foreign) == ["x.txt"], argv
