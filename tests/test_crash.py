"""Crash safety: SIGKILL a real process at a random point of corpus encoding or training, then check that the
next run resumes (finished chunks / the last saved epoch) and ends exactly like an uninterrupted run, that
nothing half-written is ever published, and that two processes encoding the same corpus do not collide.

The victims are subprocesses (tests/crash_worker.py, or the `imrnn` command); reference and resumed runs run
in-process where possible to keep the suite fast. Every kill test is repeated IMRNN_CRASH_REPEAT times
(default 1) with fresh random kill points; IMRNN_CRASH_SEED fixes them (each failure message prints its seed):

    IMRNN_CRASH_REPEAT=20 python -m pytest -q tests/test_crash.py
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from click.testing import CliRunner

import crash_worker
from imrnn.checkpoint import load_checkpoint
from imrnn.cli import app
from imrnn.encode import Encoder, EncoderConfig, encode_cached
from imrnn.workflow import QUERY_BALANCED_STATE

REPEAT = int(os.environ.get("IMRNN_CRASH_REPEAT", "1"))
BASE_SEED = int(os.environ.get("IMRNN_CRASH_SEED", random.SystemRandom().randrange(2**31)))
WORKER = Path(__file__).with_name("crash_worker.py")
TEXTS = crash_worker.corpus_texts(200)
IDS = [f"t{i}" for i in range(len(TEXTS))]
CHUNK = 16
EPOCHS = 16
TIMEOUT = 300  # seconds any one subprocess may take on a loaded machine before the test fails instead of hanging
# one intra-op thread everywhere: the same arithmetic in every process (bit-identical results across kill and
# resume), and far faster than two threads fighting for two shared cores
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}
for _var in ("IMRNN_DATA_DIR", "IMRNN_CACHE_DIR", "XDG_CACHE_HOME"):
    ENV.pop(_var, None)

repeats = pytest.mark.parametrize("repeat", range(REPEAT), ids=lambda r: f"run{r}")
pytestmark = pytest.mark.usefixtures("one_thread")


def rng_for(test: str, repeat: int) -> tuple[random.Random, str]:
    seed = BASE_SEED + 1000 * repeat + sum(map(ord, test))
    return random.Random(seed), f"[IMRNN_CRASH_SEED={BASE_SEED} repeat={repeat} seed={seed}]"


def spawn(*args: str | Path, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                            env=ENV, start_new_session=True)


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc` (if still running); True if it was killed rather than finished."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    return proc.returncode == -signal.SIGKILL


def wait_until(proc: subprocess.Popen, condition, note: str, poll: float = 0.005) -> None:
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and not condition():
        assert time.monotonic() < deadline, f"{note} the worker never reached the kill point"
        time.sleep(poll)


def bf16(encoder: Encoder) -> Encoder:
    """The workers' encoder (bf16, batch 16), sharing the session's loaded weights."""
    other = Encoder(EncoderConfig(precision="bf16"), device="cpu", batch_size=16)
    other._model = encoder.model
    return other


@pytest.fixture(scope="module")
def concurrent_run(tmp_path_factory, encoder):
    """Two worker processes encode the same corpus into one cache at the same moment (also the reference)."""
    root = tmp_path_factory.mktemp("concurrent")
    procs = [spawn("encode", "--cache", root / "cache", "--chunk", CHUNK, "--out", root / f"out{i}.npy", "--log", root / f"log{i}")
             for i in range(2)]
    for proc in procs:
        proc.wait(timeout=TIMEOUT)
    return root, procs


@pytest.fixture(scope="module")
def reference(concurrent_run) -> np.ndarray:
    return np.load(concurrent_run[0] / "out0.npy")


def entries(cache: Path) -> list[Path]:
    root = cache / "embeddings"
    return sorted(root.iterdir()) if root.is_dir() else []


def published(cache: Path) -> list[Path]:
    return [p for p in entries(cache) if p.is_dir() and not p.name.endswith(".partial") and not p.name.startswith(".")]


def assert_complete_entry(folder: Path, reference: np.ndarray, note: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.npy", "ids.json", "manifest.json"], note
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["count"] == len(TEXTS), note
    assert json.loads((folder / "ids.json").read_text()) == IDS, note
    np.testing.assert_array_equal(np.load(folder / "embeddings.npy"), reference, err_msg=note)


def test_two_processes_encoding_the_same_corpus_share_one_clean_entry(concurrent_run, encoder):
    root, procs = concurrent_run
    for proc in procs:
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    first, second = np.load(root / "out0.npy"), np.load(root / "out1.npy")
    np.testing.assert_array_equal(first, second)
    encoded = sum(int(n) for i in range(2) if (root / f"log{i}").exists() for n in (root / f"log{i}").read_text().split())
    assert encoded == len(TEXTS)  # one process encoded everything, the other waited on the lock and reused it
    (entry,) = published(root / "cache")
    assert_complete_entry(entry, first, "")
    assert not [p for p in entries(root / "cache") if p.name.endswith(".partial") or p.name.startswith(".")]


@repeats
def test_killed_encoding_resumes_from_finished_chunks(repeat, tmp_path, reference, encoder):
    rng, note = rng_for("encode", repeat)
    cache = tmp_path / "cache"
    n_chunks = -(-len(TEXTS) // CHUNK)
    wait_for, delay = rng.randint(0, n_chunks), rng.uniform(0.0, 0.4)
    note += f" kill after {wait_for} chunks + {delay:.3f}s"

    def chunk_files() -> list[Path]:
        return [f for p in entries(cache) if p.name.endswith(".partial") for f in p.glob("chunk_*.npy")]

    proc = spawn("encode", "--cache", cache, "--chunk", CHUNK)
    wait_until(proc, lambda: len(chunk_files()) >= wait_for or published(cache), note)
    time.sleep(delay)
    killed = kill(proc)
    assert killed or proc.returncode == 0, note + proc.stderr.read().decode()[-2000:]

    for entry in published(cache):  # anything published is complete and right, whatever the kill point
        assert_complete_entry(entry, reference, note)
    finished_rows = sum(int(f.stem.split("_")[2]) for f in chunk_files())
    partials = [p for p in entries(cache) if p.name.endswith(".partial")]
    assembled = any(json.loads((p / "manifest.json").read_text()).get("complete") for p in partials if (p / "manifest.json").exists())
    was_published = bool(published(cache))

    calls: list[int] = []
    resumed_encoder = bf16(encoder)
    original = resumed_encoder.encode
    resumed_encoder.encode = lambda texts, prefix="", progress=False: calls.append(len(texts)) or original(texts, prefix, progress)
    resumed = encode_cached(resumed_encoder, IDS, TEXTS, cache, chunk_size=CHUNK, progress=False)

    expected = 0 if was_published or assembled else len(TEXTS) - finished_rows
    print(f"{note}: killed={killed} published={was_published} assembled={assembled} finished_rows={finished_rows} re-encoded={sum(calls)}")
    assert sum(calls) == expected, f"{note}: re-encoded {sum(calls)} texts, expected {expected} ({finished_rows} rows were finished)"
    np.testing.assert_array_equal(np.asarray(resumed), reference, err_msg=note)
    (entry,) = published(cache)
    assert_complete_entry(entry, reference, note)
    leftovers = [p.name for p in entries(cache) if p.name.endswith(".partial") or p.name.startswith(".")]
    assert not leftovers, f"{note}: {leftovers}"


@pytest.fixture(scope="module")
def reference_training():
    return crash_worker.run_training(None, False, EPOCHS)


def assert_state_folder_is_clean(state: Path, note: str) -> None:
    """Every published epoch folder and epoch snapshot is complete and readable (only `.tmp-*` build folders and
    `.*.tmp<pid>` snapshot files may be partial)."""
    if not state.exists():
        return
    for folder in state.iterdir():
        if folder.name.startswith(".tmp-"):
            continue
        if re.fullmatch(r"member\d+", folder.name) or folder.name == QUERY_BALANCED_STATE:
            assert_state_folder_is_clean(folder, note)  # a soup member, or the other loss's soup: state folders of their own
            continue
        if folder.name == "snapshots":
            for snapshot in folder.iterdir():
                if not snapshot.name.startswith("."):
                    assert re.fullmatch(r"epoch-\d{5}\.safetensors", snapshot.name), f"{note}: {snapshot}"
                    assert "validation" in load_file(str(snapshot)), f"{note}: {snapshot}"
            continue
        assert folder.name.startswith("epoch-"), f"{note}: {folder}"
        assert sorted(p.name for p in folder.iterdir()) == ["state.json", "state.safetensors"], note
        json.loads((folder / "state.json").read_text())
        load_file(str(folder / "state.safetensors"))


def kill_at_epoch(proc: subprocess.Popen, epoch: int, delay: float, note: str) -> None:
    """Read the worker's `epoch N` lines; SIGKILL `delay` s after epoch >= `epoch` was reported."""
    deadline = time.monotonic() + TIMEOUT
    buffer = b""
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"{note} training never reached epoch {epoch}"
        ready, _, _ = select.select([proc.stdout], [], [], 0.01)
        if ready:
            buffer += os.read(proc.stdout.fileno(), 4096)
            reached = [int(line.split()[1]) for line in buffer.decode().splitlines() if line.startswith("epoch ")]
            if reached and max(reached) >= epoch:
                break
    time.sleep(delay)
    kill(proc)


@repeats
def test_killed_training_resumes_to_identical_weights(repeat, tmp_path, reference_training):
    import torch

    rng, note = rng_for("train", repeat)
    state = tmp_path / "state"
    kills, saved_epoch = rng.choice([1, 2]), 0
    for attempt in range(kills):
        if saved_epoch >= EPOCHS - 1:
            break
        epoch, delay = rng.randint(saved_epoch + 1, EPOCHS - 1), rng.uniform(0.0, 0.2)  # an epoch lasts ~0.1-0.3 s
        note += f" kill#{attempt + 1} at epoch {epoch} + {delay:.3f}s;"
        proc = spawn("train", "--state", state, "--epochs", EPOCHS, *(["--resume"] if attempt else []), stdout=subprocess.PIPE)
        kill_at_epoch(proc, epoch, delay, note)
        assert proc.returncode in (0, -signal.SIGKILL), note + proc.stderr.read().decode()[-2000:]
        assert_state_folder_is_clean(state, note)
        saved_epoch = max((int(p.name.split("-")[1]) for p in state.glob("epoch-*")), default=0)
    saved = sorted(p.name for p in state.glob("epoch-*")) if state.exists() else []
    print(f"{note} resuming from {saved or 'scratch'}")
    resumed = crash_worker.run_training(state, True, EPOCHS)
    expected = reference_training.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{note} tensor {name} differs from the uninterrupted run"
    assert resumed.history == reference_training.history and resumed.best_epoch == reference_training.best_epoch, note


def test_resume_refuses_a_state_from_another_run(tmp_path):
    from imrnn.errors import CheckpointError

    crash_worker.run_training(tmp_path / "state", False, 2)
    with pytest.raises(CheckpointError, match="another configuration or other training data"):
        crash_worker.run_training(tmp_path / "state", True, 3)  # epochs differ: a different run
    (folder,) = (tmp_path / "state").glob("epoch-*")
    (folder / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        crash_worker.run_training(tmp_path / "state", True, 2)
    fresh = crash_worker.run_training(tmp_path / "state", False, 2)  # without resume: starts over, no error
    assert len(fresh.history) == 3


@repeats
def test_cli_train_killed_then_resumed_gives_the_same_checkpoint(repeat, tmp_path, write_tiny_beir):
    rng, note = rng_for("cli", repeat)
    folder = write_tiny_beir(tmp_path / "data" / "tiny")
    cache = tmp_path / "cache"
    epochs = 25
    common = ["train", "--dataset", str(folder), "--cache-dir", str(cache), "--no-download", "--k", "10", "--epochs", str(epochs),
              "--patience", str(epochs), "--batch-size", "8", "--train-batch-size", "2", "--seed", "3", "--dropout", "0.2",
              "--min-queries", "0"]
    runner = CliRunner()
    env = {"IMRNN_DATA_DIR": None, "IMRNN_CACHE_DIR": None, "XDG_CACHE_HOME": None}
    reference = runner.invoke(app, common + ["--output", str(tmp_path / "reference")], env=env)
    assert reference.exit_code == 0, reference.output
    assert not (tmp_path / "reference.state").exists()  # removed once the checkpoint is written

    output, state = tmp_path / "ckpt", tmp_path / "ckpt.state"
    # the default trains a soup of three members for each of the two losses, the second in `query-balanced/`
    epoch, delay = rng.randint(1, 6 * epochs - 1), rng.uniform(0.0, 0.3)
    note += f" kill after {epoch} saved epochs + {delay:.3f}s"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("imrnn")), *common, "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True)

    def saved_epoch() -> int:  # summed over both soups' members, each training in its own state folder
        members = [*state.glob("member*"), *state.glob(f"{QUERY_BALANCED_STATE}/member*")] if state.is_dir() else []
        return sum(max((int(p.name.split("-")[1]) for p in member.glob("epoch-*")), default=0) for member in members)

    wait_until(proc, lambda: saved_epoch() >= epoch, note)
    time.sleep(delay)
    killed = kill(proc)
    assert killed or proc.returncode == 0, note + proc.stderr.read().decode()[-2000:]
    assert_state_folder_is_clean(state, note)
    print(f"{note}: killed={killed} resuming from epoch {saved_epoch()}")
    if output.exists():  # the checkpoint folder appears only whole (atomic rename)
        load_checkpoint(output)
    resumed = runner.invoke(app, common + ["--output", str(output), "--resume"], env=env)
    assert resumed.exit_code == 0, note + resumed.output
    expected = load_file(str(tmp_path / "reference" / "model.safetensors"))
    got = load_file(str(output / "model.safetensors"))
    assert sorted(got) == sorted(expected), note
    for name in expected:
        assert (got[name] == expected[name]).all(), f"{note}: {name} differs from the uninterrupted run"
    assert not state.exists(), note
