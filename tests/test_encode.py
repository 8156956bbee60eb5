"""The frozen encoder and its on-disk, resumable, memory-mapped embedding cache (small inputs only)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from filelock import FileLock

from imrnn.encode import (Encoder, EncoderConfig, cache_key, cache_manifest, encode_cached, encode_corpus, encode_queries,
                          resolve_device, resolve_precision)
from imrnn.errors import ConfigError

TEXTS = [
    "The Moon orbits the Earth.",
    "Insulin lowers blood sugar.",
    "Paris is the capital of France.",
    "Bees make honey from nectar in flowers, storing it in wax combs inside the hive.",
    "Chess",
    "Volcanoes erupt lava and ash when pressure in the magma chamber below becomes too high.",
] + [f"Sentence number {i} about topic {i % 5} with {'some ' * (i % 7)}padding." for i in range(10)]
IDS = [f"t{i}" for i in range(len(TEXTS))]


@pytest.fixture
def calls(monkeypatch):
    """Count (and record the texts of) every Encoder.encode call; `calls.fail_at = n` makes call n raise."""

    class Recorder(list):
        fail_at: int | None = None

    record = Recorder()
    record.prefixes = []
    original = Encoder.encode

    def counting(self, texts, prefix="", progress=False):
        record.append(list(texts))
        record.prefixes.append(prefix)
        if record.fail_at == len(record):
            raise KeyboardInterrupt("simulated interruption")
        return original(self, texts, prefix, progress)

    counting.__wrapped__ = original
    monkeypatch.setattr(Encoder, "encode", counting)
    return record


def with_config(encoder: Encoder, **changes) -> Encoder:
    """Another Encoder sharing the loaded weights (no second model load), with a different config."""
    config = EncoderConfig(**{**encoder.config.__dict__, **changes})
    other = Encoder(config, device=encoder.device, batch_size=encoder.batch_size)
    other._model = encoder.model
    return other


def test_encoder_gives_unit_norm_float32(encoder):
    texts = ["What is the capital of France?", "Paris is the capital of France.", "Bees make honey."]
    embs = encoder.encode(texts)
    assert embs.shape == (3, 384) and embs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
    assert embs[0] @ embs[1] > embs[0] @ embs[2] + 0.3  # the embedding carries meaning
    assert encoder.dimension == 384
    assert encoder.encode([]).shape == (0, 384)
    prefixed = encoder.encode(texts[:1], prefix="query: ")
    assert 0.5 < float(prefixed[0] @ embs[0]) < 0.9999  # a prefix is really prepended


def test_encoder_config_validation():
    with pytest.raises(ConfigError, match="precision must be one of"):
        EncoderConfig(precision="fp16")
    with pytest.raises(ConfigError, match="max_length must be positive"):
        EncoderConfig(max_length=0)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        Encoder(batch_size=0)


def test_unloadable_model_is_a_config_error(tmp_path):
    enc = Encoder(EncoderConfig(model=str(tmp_path / "no-such-model")))
    with pytest.raises(ConfigError, match="Could not load encoder"):
        enc.encode(["x"])


def test_bf16_agrees_with_fp32_on_scifact(encoder, shared_datasets):
    passages = []
    with open(shared_datasets / "scifact" / "corpus.jsonl", encoding="utf-8") as handle:
        for line, _ in zip(handle, range(30)):
            record = json.loads(line)
            passages.append(f"{record['title']} {record['text']}".strip())
    fp32 = encoder.encode(passages)
    bf16 = with_config(encoder, precision="bf16").encode(passages)
    assert bf16.shape == fp32.shape == (30, 384) and bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(axis=1)
    assert cosine.min() >= 0.999
    assert not np.array_equal(fp32, bf16)  # bf16 autocast really ran


def test_a_process_waiting_for_the_cache_lock_says_so_then_goes_on(encoder, tmp_path, capsys):
    """While another process holds the cache entry's lock, encode_cached says on stderr what it waits for (instead of
    hanging silently); once the lock is free it goes on (here it encodes: the holder published nothing)."""
    expected = encode_cached(encoder, IDS, TEXTS, tmp_path / "other", progress=False)
    lock = FileLock(str(tmp_path / "embeddings" / f"{cache_key(cache_manifest(encoder, IDS, TEXTS, ''))}.lock"))
    (tmp_path / "embeddings").mkdir()
    lock.acquire()  # "another process": a second open file description of the same lock file
    result: list[np.ndarray] = []
    waiter = threading.Thread(target=lambda: result.append(encode_cached(encoder, IDS, TEXTS, tmp_path, progress=True)))
    waiter.start()
    try:
        deadline = time.monotonic() + 30
        while "waiting for another process" not in capsys.readouterr().err:
            assert time.monotonic() < deadline and waiter.is_alive(), "no waiting message while the lock was held"
            time.sleep(0.05)
    finally:  # a failed check must not leave the waiter blocked forever
        lock.release()
        waiter.join(timeout=60)
    assert not waiter.is_alive() and len(result) == 1
    np.testing.assert_allclose(result[0], expected, rtol=0, atol=1e-6)


def test_encode_cached_hits_without_calling_the_model(encoder, calls, tmp_path):
    first = encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=5, progress=False)
    assert len(calls) == 4  # 16 texts in chunks of 5
    assert sorted(t for c in calls for t in c) == sorted(TEXTS)
    assert first.shape == (16, 384) and first.dtype == np.float32
    np.testing.assert_allclose(first, encoder.encode(TEXTS), atol=2e-5)  # rows follow the input order
    del calls[:]
    second = encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=5, progress=False)
    assert calls == []
    assert isinstance(second, np.memmap) and isinstance(first, np.memmap)
    assert not second.flags.writeable
    np.testing.assert_array_equal(np.asarray(second), np.asarray(first))
    entries = list((tmp_path / "embeddings").iterdir())
    folder = next(p for p in entries if p.is_dir())
    assert [p.name for p in entries if p.is_dir()] == [folder.name]  # one entry, no .partial left
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.npy", "ids.json", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["count"] == 16 and manifest["dimension"] == 384
    assert json.loads((folder / "ids.json").read_text()) == IDS


def test_changed_text_ids_or_prefix_miss_the_cache(encoder, calls, tmp_path):
    base = encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=50, progress=False)
    assert len(calls) == 1
    changed = list(TEXTS)
    changed[4] = "Checkers"
    other = encode_cached(encoder, IDS, changed, tmp_path, chunk_size=50, progress=False)
    assert len(calls) == 2
    assert not np.allclose(other[4], base[4]) and np.allclose(np.delete(other, 4, 0), np.delete(base, 4, 0), atol=2e-5)
    encode_cached(encoder, [f"x{i}" for i in range(len(IDS))], TEXTS, tmp_path, chunk_size=50, progress=False)
    assert len(calls) == 3
    prefixed_encoder = with_config(encoder, passage_prefix="passage: ")
    prefixed = encode_cached(prefixed_encoder, IDS, TEXTS, tmp_path, chunk_size=50, progress=False)
    assert len(calls) == 4
    assert calls[-1] == [t for t in sorted(TEXTS, key=len)]
    assert not np.allclose(prefixed, base, atol=1e-3)
    # a query prefix changes query embeddings
    query_encoder = with_config(encoder, query_prefix="query: ")
    encode_cached(query_encoder, IDS, TEXTS, tmp_path, kind="query", chunk_size=50, progress=False)
    assert len(calls) == 5
    assert calls.prefixes[-2:] == ["passage: ", "query: "]
    encode_cached(query_encoder, IDS, TEXTS, tmp_path, kind="query", chunk_size=50, progress=False)
    assert len(calls) == 5


def test_interrupted_encoding_resumes_from_finished_chunks(encoder, calls, tmp_path):
    calls.fail_at = 3
    with pytest.raises(KeyboardInterrupt):
        encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=4, progress=False)  # 4 chunks
    assert len(calls) == 3
    done = [t for c in calls[:2] for t in c]
    assert not any(p.is_dir() and not p.name.endswith(".partial") for p in (tmp_path / "embeddings").iterdir())
    calls.fail_at = None
    del calls[:]
    resumed = encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=4, progress=False)
    assert len(calls) == 2  # only the 2 unfinished chunks
    again = [t for c in calls for t in c]
    assert sorted(done + again) == sorted(TEXTS) and not set(done) & set(again)
    np.testing.assert_allclose(resumed, Encoder.encode.__wrapped__(encoder, TEXTS), atol=2e-5)
    assert not list((tmp_path / "embeddings").glob("*.partial"))


def test_resume_with_another_chunk_size(encoder, calls, tmp_path):
    calls.fail_at = 3
    with pytest.raises(KeyboardInterrupt):
        encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=5, progress=False)
    calls.fail_at = None
    del calls[:]
    resumed = encode_cached(encoder, IDS, TEXTS, tmp_path, chunk_size=7, progress=False)
    np.testing.assert_allclose(resumed, Encoder.encode.__wrapped__(encoder, TEXTS), atol=2e-5)
    folder = next(p for p in (tmp_path / "embeddings").iterdir() if p.is_dir())
    assert not list(folder.glob("chunk_*"))


@pytest.mark.parametrize("corruption", ["garbage", "incomplete", "other_fingerprint", "truncated_array", "no_array"])
def test_corrupted_entry_is_not_reused(encoder, calls, tmp_path, corruption):
    good = np.array(encode_cached(encoder, IDS[:8], TEXTS[:8], tmp_path, chunk_size=8, progress=False))
    folder = next(p for p in (tmp_path / "embeddings").iterdir() if p.is_dir())
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if corruption == "garbage":
        manifest_path.write_text('{"format": 1, "model": ')
    elif corruption == "incomplete":
        manifest_path.write_text(json.dumps(dict(manifest, complete=False)))
    elif corruption == "other_fingerprint":
        manifest_path.write_text(json.dumps(dict(manifest, fingerprint="0" * 64)))
    elif corruption == "truncated_array":
        raw = (folder / "embeddings.npy").read_bytes()
        (folder / "embeddings.npy").write_bytes(raw[: len(raw) // 2])
    else:
        (folder / "embeddings.npy").unlink()
    assert len(calls) == 1
    rebuilt = encode_cached(encoder, IDS[:8], TEXTS[:8], tmp_path, chunk_size=8, progress=False)
    assert len(calls) == 2
    np.testing.assert_allclose(rebuilt, good, atol=1e-6)
    encode_cached(encoder, IDS[:8], TEXTS[:8], tmp_path, chunk_size=8, progress=False)
    assert len(calls) == 2  # the repaired entry is a hit


def test_encode_cached_rejects_bad_arguments(encoder, tmp_path):
    with pytest.raises(ConfigError, match="differ in length"):
        encode_cached(encoder, IDS[:3], TEXTS[:2], tmp_path)
    with pytest.raises(ConfigError, match="chunk_size must be positive"):
        encode_cached(encoder, IDS[:2], TEXTS[:2], tmp_path, chunk_size=0)


def test_encode_cached_empty_input(encoder, calls, tmp_path):
    out = encode_cached(encoder, [], [], tmp_path, progress=False)
    assert out.shape == (0, 384) and out.dtype == np.float32
    assert calls == []


def test_encode_corpus_and_queries_align_rows_with_ids(encoder, tiny_beir, tmp_path):
    from imrnn.data import load_beir

    data = load_beir(tiny_beir())
    docs = encode_corpus(encoder, data.corpus, tmp_path / "cache", progress=False)
    queries = data.split("test")
    q = encode_queries(encoder, queries, tmp_path / "cache")
    assert docs.shape == (20, 384) and q.shape == (4, 384)
    np.testing.assert_allclose(docs[5], encoder.encode([data.corpus.passages()[5]])[0], atol=2e-5)
    best = data.corpus.ids[np.argmax(q @ docs.T, axis=1)].tolist()
    assert best == ["d7", "d6", "d20", "d19"]  # each test query finds its relevant document first


def test_auto_precision_is_bf16_exactly_where_the_cpu_computes_bf16_natively(monkeypatch):
    import imrnn.encode as encode_module

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    native = bool({"amx_bf16", "avx512_bf16"} & encode_module.cpu_flags())
    assert Encoder(EncoderConfig()).precision == ("bf16" if native else "fp32")  # this machine, as /proc/cpuinfo says
    for flags, expected in ((frozenset({"avx2", "avx512f"}), "fp32"), (frozenset({"avx512_bf16"}), "bf16"),
                            (frozenset({"amx_bf16", "amx_tile"}), "bf16"), (frozenset(), "fp32")):
        monkeypatch.setattr(encode_module, "cpu_flags", lambda flags=flags: flags)
        assert resolve_precision("auto", "cpu") == expected, flags
        described = Encoder(EncoderConfig()).describe()  # says why auto chose what it chose
        assert (f"bf16 autocast on cpu ({', '.join(sorted(flags - {'amx_tile'}))})" if expected == "bf16"
                else "fp32 on cpu (no native bf16 on this CPU: amx_bf16 / avx512_bf16 absent)") in described
    assert "absent" not in Encoder(EncoderConfig(precision="fp32")).describe()  # asked for, not chosen
    assert resolve_precision("auto", "mps") == "fp32"
    # the batch size follows the resolved precision (the fastest measured), unless given
    assert Encoder(EncoderConfig(precision="fp32")).batch_size == 64 and Encoder(EncoderConfig(precision="bf16")).batch_size == 32
    assert Encoder(EncoderConfig(precision="bf16"), batch_size=8).batch_size == 8


def test_auto_precision_keys_the_cache_by_what_it_resolved_to(encoder, tmp_path):
    """`auto` and the precision it stands for share cache entries; fp32 and bf16 never do."""
    resolved = Encoder(EncoderConfig(precision="auto"))
    same = Encoder(EncoderConfig(precision=resolved.precision))
    other = Encoder(EncoderConfig(precision="fp32" if resolved.precision == "bf16" else "bf16"))
    manifest = lambda enc: cache_manifest(enc, IDS, TEXTS, "")  # noqa: E731
    assert manifest(resolved) == manifest(same) != manifest(other)
    assert resolved.precision in resolved.describe()


def test_device_auto_is_the_gpu_where_torch_sees_one_and_an_unusable_device_is_refused(monkeypatch):
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")  # this machine
    auto = Encoder(device="auto")
    assert resolve_device("cpu") == "cpu" and auto.device == resolve_device("auto")
    assert auto.precision == Encoder(device=auto.device).precision  # auto precision follows the resolved device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match=r"torch sees 1 CUDA GPU\(s\): pass cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="sees no CUDA GPU: pass --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="Unknown device 'gpu': pass auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="'mps' is not supported"):
        Encoder(device="mps")
