"""Encoding paths side by side: speed on SciFact passages as ratios to fp32 in one run, and retrieval quality.

Usage (from the repository root, after the README's install command):
    python benchmarks/encode_speed.py          # torch paths: fp32 and bf16 autocast at several batch sizes, dynamic int8
    python benchmarks/encode_speed.py --onnx-python /tmp/onnxvenv/bin/python --quality
        # + ONNX Runtime fp32 / dynamic int8 (optimum export; its environment: see benchmarks/_onnx_encode.py)
        # + nDCG@10 of the frozen retriever and of the default adapter (seed 42) on SciFact and NFCorpus test, for
        #   fp32, bf16 at its default batch (only where bf16 is native) and int8 (--onnx-quality: the ONNX paths too)
Speed is measured on an evenly spaced sample of SciFact's corpus (`--passages`, 0 = all 5,183), each path timed in
alternating rounds in the same process (best round kept), so machine load affects every path alike; the ONNX paths
run in their own process together with a torch fp32 reference, and their ratio is to that reference. Each torch
path's embeddings of the timed passages are compared with fp32's (cosine, minimum and mean). On a CPU without native
bf16 the bf16 batch sweep is skipped (emulated bf16 is timed once, at batch 32). Writes `--output`
(benchmarks/results/encode-speed.json) and prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imrnn.config import EncoderConfig, TrainConfig
from imrnn.data import Dataset, load_dataset
from imrnn.encode import NATIVE_BF16_FLAGS, Encoder, cpu_flags, resolve_precision
from imrnn.model import IMRNN
from imrnn.workflow import SplitPlan, Workspace, evaluate, train

HERE = Path(__file__).resolve().parent
DATA_DIR = os.environ.get("IMRNN_DATA_DIR", str(HERE.parent.parent / "shared" / "datasets"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sample(texts: Sequence[str], count: int) -> list[str]:
    """`count` evenly spaced texts (all of them for 0): the corpus's length distribution, in a fixed order."""
    if count <= 0 or count >= len(texts):
        return list(texts)
    return [texts[i] for i in np.linspace(0, len(texts) - 1, count).astype(int)]


class Int8Encoder(Encoder):
    """torch dynamic int8: the Linear layers' weights quantised per output channel, activations per batch (fbgemm
    kernels: VNNI where the CPU has it, AVX2 otherwise). Its own identity keys imrnn's embedding cache, so its
    embeddings never mix with fp32's."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__(EncoderConfig(precision="fp32"), batch_size=batch_size)

    @property
    def identity(self) -> str:
        return f"{super().identity}@torch-dynamic-int8"

    @property
    def model(self) -> Any:
        if self._model is None:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            with warnings.catch_warnings():  # torch.ao's notice that this API moves to torchao
                warnings.simplefilter("ignore")
                self._model = quantize_dynamic(Encoder(self.config).model,
                                               {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return self._model


def torch_paths(native_bf16: bool) -> dict[str, Encoder]:
    """The torch candidates: fp32 and bf16 autocast at their batch sizes (the bf16 sweep only where bf16 is native;
    elsewhere it is emulated and timed once, at its default batch) and dynamic int8. "fp32" comes first."""
    shared = Encoder(EncoderConfig(precision="fp32"))
    paths = {"fp32": ("fp32", 64), "fp32 batch 16": ("fp32", 16), "fp32 batch 32": ("fp32", 32), "bf16": ("bf16", 64)}
    if native_bf16:
        paths.update({"bf16 batch 16": ("bf16", 16), "bf16 batch 32": ("bf16", 32), "bf16 batch 128": ("bf16", 128)})
    else:
        paths = {name: path for name, path in paths.items() if name != "bf16"} | {"bf16 batch 32": ("bf16", 32)}
    encoders: dict[str, Encoder] = {}
    for name, (precision, batch) in paths.items():
        encoders[name] = Encoder(EncoderConfig(precision=precision), batch_size=batch)
        encoders[name]._model = shared.model  # one copy of the weights; autocast decides the arithmetic
    encoders["int8"] = Int8Encoder()
    return encoders


def torch_speed(encoders: dict[str, Encoder], texts: list[str], rounds: int) -> tuple[dict[str, float], dict[str, dict]]:
    """Passages per second of each path (best of `rounds` alternating rounds), and how far each path's embeddings
    of `texts` are from fp32's (cosine: minimum and mean over the passages)."""
    outputs = {}
    for name, encoder in encoders.items():
        encoder.encode(texts[:32])  # warm-up
    best = {name: float("inf") for name in encoders}
    for _ in range(rounds):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            outputs[name] = encoder.encode(texts)
            best[name] = min(best[name], time.perf_counter() - start)
    cosines = {name: (out * outputs["fp32"]).sum(axis=1) for name, out in outputs.items()}
    fidelity = {name: {"min": float(c.min()), "mean": float(c.mean())} for name, c in cosines.items()}
    return {name: len(texts) / seconds for name, seconds in best.items()}, fidelity


def padding_efficiency(texts: list[str], batch_size: int = 64) -> dict[str, float]:
    """Share of real tokens in the padded batches when passages are batched in character-length order (what
    imrnn and sentence-transformers do) versus exact token-length order."""
    tokenizer = Encoder().model.tokenizer
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]])

    def efficiency(order: np.ndarray) -> float:
        batches = [lengths[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
        return float(sum(b.sum() for b in batches) / sum(b.max() * len(b) for b in batches))

    by_chars = np.argsort([-len(t) for t in texts], kind="stable")
    return {"char-length order": efficiency(by_chars), "token-length order": efficiency(np.argsort(-lengths, kind="stable")),
            "input order": efficiency(np.arange(len(texts)))}


class PrecomputedEncoder(Encoder):
    """Serves embeddings computed elsewhere (the ONNX process) through imrnn's workflow, keyed by text."""

    def __init__(self, name: str, texts: Sequence[str], embeddings: np.ndarray) -> None:
        super().__init__(EncoderConfig(precision="fp32"))
        self.name, self.rows = name, {t: i for i, t in enumerate(texts)}
        self.embeddings = embeddings

    @property
    def identity(self) -> str:
        return f"{self.config.model}@{self.name}"

    @property
    def dimension(self) -> int:
        return int(self.embeddings.shape[1])

    def encode(self, texts: Sequence[str], prefix: str = "", progress: bool = False) -> np.ndarray:
        return self.embeddings[[self.rows[prefix + t] for t in texts]]


def quality(dataset: Dataset, encoder: Encoder, cache_dir: str | None, fp32_model: IMRNN | None) -> tuple[dict, IMRNN]:
    """nDCG@10 on the official test split: the frozen retriever, the default adapter recipe (seed 42) trained on
    this path's embeddings, and the adapter trained on fp32 embeddings applied to this path's embeddings (the
    inference-only change, free of the training run's own sensitivity)."""
    workspace = Workspace.open(dataset, encoder, 100, cache_dir=cache_dir, progress=False)
    plan = SplitPlan.official(dataset, seed=42)
    model = train(workspace, plan, TrainConfig(seed=42), progress=False).model
    report = evaluate(model, workspace, plan)
    reference = evaluate(fp32_model or model, workspace, plan)
    return {"frozen": report.overall.base["nDCG@10"], "adapted": report.overall.adapted["nDCG@10"],
            "fp32_adapter": reference.overall.adapted["nDCG@10"]}, model


def onnx_paths(python: str, speed_texts: list[str], datasets: dict[str, Dataset], rounds: int, work: Path) -> dict:
    """Run benchmarks/_onnx_encode.py in the ONNX environment: speed, and embeddings of every corpus and query."""
    encode = {}
    for name, data in datasets.items():
        encode[f"{name}-corpus"] = data.corpus.passages()
        encode[f"{name}-queries"] = [data.queries[q] for q in sorted(data.queries)]
    spec = work / "spec.json"
    spec.write_text(json.dumps({"speed": speed_texts, "encode": encode, "rounds": rounds, "batch_size": 64, "work": str(work)}))
    out = subprocess.run([python, str(HERE / "_onnx_encode.py"), str(spec)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["texts"] = encode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=1024, help="SciFact passages timed per round (0 = the whole corpus)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--onnx-python", default=None, help="interpreter of the ONNX environment (see _onnx_encode.py)")
    parser.add_argument("--quality", action="store_true", help="also nDCG@10 on SciFact and NFCorpus test of fp32, "
                        "of bf16 at its default batch (where bf16 is native) and of dynamic int8")
    parser.add_argument("--onnx-quality", action="store_true", help="with --onnx-python: the same for the ONNX paths "
                        "(encodes both corpora once more per ONNX path)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "encode-speed.json")
    args = parser.parse_args()
    flags = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    results: dict = {"date": date.today().isoformat(), "cpu": cpu_name(), "native_bf16": flags,
                     "auto_resolves_to": resolve_precision("auto", "cpu"), "torch_threads": torch.get_num_threads(),
                     "load_before": os.getloadavg()}
    datasets = {name: load_dataset(name, DATA_DIR, None, download=False) for name in ("scifact", "nfcorpus")}
    texts = sample(datasets["scifact"].corpus.passages(), args.passages)
    results["passages"] = len(texts)
    speed, fidelity = torch_speed(torch_paths(bool(flags)), texts, args.rounds)
    results["cosine_to_fp32"] = fidelity
    results["padding"] = padding_efficiency(texts)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = (onnx_paths(args.onnx_python, texts, datasets if args.onnx_quality else {}, args.rounds, Path(tmp))
                if args.onnx_python else None)
        ratios = {name: value / speed["fp32"] for name, value in speed.items()}
        if onnx:
            reference = onnx["passages_per_second"]["torch-fp32"]
            for name in ("onnx-fp32", "onnx-int8"):
                speed[name] = onnx["passages_per_second"][name]
                ratios[name] = speed[name] / reference
            results["onnx_process_torch_fp32"] = reference
        results["speed"] = {name: {"passages_per_second": speed[name], "ratio_to_fp32": ratios[name]} for name in speed}
        if args.quality:
            results["quality"], fp32_models = {}, {}
            torch_encoders = {"fp32": lambda: Encoder(EncoderConfig(precision="fp32")),
                              "bf16 batch 32": lambda: Encoder(EncoderConfig(precision="bf16")), "int8": Int8Encoder}
            if not flags:
                del torch_encoders["bf16 batch 32"]  # emulated bf16 encodes at a fraction of fp32's speed
            for name in [*torch_encoders] + (["onnx-fp32", "onnx-int8"] if onnx and args.onnx_quality else []):
                for ds, data in datasets.items():
                    if name.startswith("onnx"):
                        texts_all = onnx["texts"][f"{ds}-corpus"] + onnx["texts"][f"{ds}-queries"]
                        embs = np.concatenate([np.load(onnx["files"][f"{name}/{ds}-corpus"]),
                                               np.load(onnx["files"][f"{name}/{ds}-queries"])])
                        encoder, cache = PrecomputedEncoder(name, texts_all, embs), tmp
                    else:  # imrnn's embedding cache, keyed by precision (and by identity for int8)
                        encoder, cache = torch_encoders[name](), None
                    figures, model = quality(data, encoder, cache, fp32_models.get(ds))
                    fp32_models.setdefault(ds, model)  # the first path is fp32
                    results["quality"].setdefault(name, {})[ds] = figures
    results["load_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(args.output)
    print(f"CPU: {results['cpu']}; native bf16: {', '.join(flags) or 'none'} (auto -> {results['auto_resolves_to']}); "
          f"torch threads {results['torch_threads']}; load average {results['load_before'][0]:.1f} before, "
          f"{results['load_after'][0]:.1f} after; {len(texts)} SciFact passages, best of {args.rounds} rounds\n")
    parts = ("frozen", "adapted", "fp32_adapter")
    quality_cols = "".join(f" | {ds} {part.replace('_', ' ')}" for ds in ("SciFact", "NFCorpus") for part in parts)
    quality_cols = quality_cols if args.quality else ""
    print(f"| path | passages/s | × fp32 | cosine to fp32 (min / mean){quality_cols} |\n|---|---:|---:|---:"
          + "|---:" * (6 if args.quality else 0) + "|")
    for name in speed:
        cosine = fidelity.get(name)
        cells = [name, f"{speed[name]:.1f}", f"{ratios[name]:.2f}",
                 f"{cosine['min']:.5f} / {cosine['mean']:.5f}" if cosine else ""]
        q = results.get("quality", {}).get(name)
        if q:
            cells += [f"{q[ds][part]:.4f}" for ds in ("scifact", "nfcorpus") for part in parts]
        elif args.quality:
            cells += [""] * 6
        print("| " + " | ".join(cells) + " |")
    print("\npadding (share of real tokens in batches of 64): "
          + ", ".join(f"{k} {v:.3f}" for k, v in results["padding"].items()))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total wall time {time.perf_counter() - started:.0f}s")
