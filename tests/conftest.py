"""Shared fixtures: offline hub settings, the shared datasets, a tiny BEIR folder factory, the encoder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
from pathlib import Path
from typing import Callable

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SCIFACT = SHARED_DATASETS / "scifact"

# Twenty short documents on distinct topics, so that even a small encoder ranks the right one first.
TINY_DOCS: dict[str, tuple[str, str]] = {
    "d1": ("Paris", "Paris is the capital and largest city of France, on the river Seine."),
    "d2": ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into glucose and oxygen."),
    "d3": ("Mount Everest", "Mount Everest in the Himalayas is the highest mountain above sea level."),
    "d4": ("Python", "Python is a programming language known for readable code and indentation."),
    "d5": ("Honey bees", "Honey bees collect nectar from flowers and store honey in wax combs."),
    "d6": ("Jupiter", "Jupiter is the largest planet in the solar system, a gas giant with a great red spot."),
    "d7": ("Insulin", "Insulin is a hormone made by the pancreas that lowers blood sugar."),
    "d8": ("Chess", "Chess is a board game where two players move kings, queens, rooks and pawns."),
    "d9": ("Coffee", "Coffee is brewed from roasted beans and contains caffeine, a stimulant."),
    "d10": ("Volcanoes", "Volcanoes erupt molten lava, ash and gases from magma chambers below."),
    "d11": ("Tokyo", "Tokyo is the capital of Japan and one of the most populous cities on earth."),
    "d12": ("DNA", "DNA is a double helix molecule that carries genetic instructions in cells."),
    "d13": ("Football", "Football, or soccer, is played by two teams of eleven kicking a ball into goals."),
    "d14": ("Penguins", "Penguins are flightless seabirds living mostly in Antarctica that swim well."),
    "d15": ("Bread", "Bread is baked from flour, water and yeast, which makes the dough rise."),
    "d16": ("Mexican peso", "The peso is the currency of Mexico, issued by the Bank of Mexico."),
    "d17": ("Violin", "The violin is a string instrument played with a bow, central to orchestras."),
    "d18": ("Earthquakes", "Earthquakes happen when tectonic plates slip and release seismic waves."),
    "d19": ("Vaccines", "Vaccines train the immune system to recognise a virus without causing disease."),
    "d20": ("Moon", "The Moon orbits the Earth every 27 days and causes the ocean tides."),
}
TINY_QUERIES: dict[str, str] = {
    "q1": "What is the capital of France?",
    "q2": "How do plants make oxygen from sunlight?",
    "q3": "Which is the tallest mountain in the world?",
    "q4": "What is the currency of Mexico?",
    "q5": "Which hormone controls blood sugar?",
    "q6": "What is the biggest planet?",
    "q7": "What causes ocean tides?",
    "q8": "How do vaccines protect against viruses?",
    "q9": "A query that is judged but has no relevant document",
}
TINY_QRELS: dict[str, dict[str, dict[str, int]]] = {
    "train": {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1, "d10": 0}, "q4": {"d16": 2, "d11": 0}},
    "test": {"q5": {"d7": 1}, "q6": {"d6": 2, "d20": 1}, "q7": {"d20": 1}, "q8": {"d19": 1}, "q9": {"d1": 0}},
}


def write_beir(
    folder: Path,
    docs: dict[str, tuple[str, str]] = TINY_DOCS,
    queries: dict[str, str] = TINY_QUERIES,
    qrels: dict[str, dict[str, dict[str, int]]] = TINY_QRELS,
) -> Path:
    """Write a valid BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv with header)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as out:
        for did, (title, text) in docs.items():
            out.write(json.dumps({"_id": did, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as out:
        for qid, text in queries.items():
            out.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, judged in qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            for qid, docs_ in judged.items():
                for did, rel in docs_.items():
                    out.write(f"{qid}\t{did}\t{rel}\n")
    return folder


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """`../shared/datasets` beside the repository (SciFact, NFCorpus, Cranfield in BEIR layout, read-only)."""
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def write_tiny_beir() -> Callable[..., Path]:
    """`write_beir(folder, docs=..., queries=..., qrels=...)`, for fixtures wider than one test."""
    return write_beir


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `tiny_beir(name="tiny", root=None, docs=..., queries=..., qrels=...)` writes a BEIR folder.

    The folder is `<root or tmp_path/"data">/<name>`; the default content is TINY_DOCS / TINY_QUERIES /
    TINY_QRELS (20 docs, 9 queries, train and test qrels). Tests corrupt the written files to make bad inputs.
    """

    def make(name: str = "tiny", root: Path | None = None, **content) -> Path:
        return write_beir((root or tmp_path / "data") / name, **content)

    make.docs, make.queries, make.qrels = TINY_DOCS, TINY_QUERIES, TINY_QRELS  # type: ignore[attr-defined]
    return make


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No data/cache settings leak in from the environment; the default cache is a fresh temp folder."""
    for var in ("IMRNN_DATA_DIR", "IMRNN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return home


@pytest.fixture(scope="session")
def encoder():
    """The bundled all-MiniLM-L6-v2, fp32 on CPU, loaded once per session."""
    from imrnn.encode import Encoder, EncoderConfig

    enc = Encoder(EncoderConfig(precision="fp32"), device="cpu", batch_size=16)
    enc.model  # load now, so per-test timings do not include it
    return enc


# --------------------------------------------------------------------------- hypothesis profiles (fuzz tests)
# `default`: bounded, so the whole default suite stays fast; `long`: `pytest --hypothesis-profile=long`
# (add `--hypothesis-show-statistics` to see how many cases each fuzz test tried). Deadlines are off: this
# machine's timings are noisy; the fuzz tests bound their own inputs instead.
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=_FUZZ_HEALTH)
settings.load_profile("default")


def unit(rng, *shape: int):
    """Random unit vectors (float32) of the given shape, normalised along the last axis."""
    import numpy as np

    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def randomised(model, seed: int = 0):
    """Give every weight (incl. the zero-initialised heads) random values, so the adapter is not the identity."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs: one torch thread is as fast alone and far faster on a shared, busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
