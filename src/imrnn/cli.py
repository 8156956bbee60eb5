"""The `imrnn` command: one thin sub-command per pipeline stage, plus `run` for the whole pipeline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import IMRNNError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="IMRNN: interpretable adapters for dense retrieval.")

DatasetOpt = typer.Option(None, "--dataset", "-d", help="BEIR dataset name (searched on the data path) or folder path.")
DataDirOpt = typer.Option(None, "--data-dir", envvar="IMRNN_DATA_DIR", help="Folder(s) holding BEIR datasets, ':'-separated.")
CacheDirOpt = typer.Option(None, "--cache-dir", envvar="IMRNN_CACHE_DIR", help="Cache for embeddings and downloads [default: ~/.cache/imrnn].")
SplitOpt = typer.Option("test", "--split", "-s", help="Qrels split to use (a file name in qrels/, e.g. test).")
ModelOpt = typer.Option(None, "--model", "-m", help="sentence-transformers model name or path [default: bundled all-MiniLM-L6-v2].")
DeviceOpt = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1 ...")
PrecisionOpt = typer.Option("fp32", "--precision", help="Encoding precision: fp32, or bf16 (autocast; ~2.5x faster on CPU).")
BatchOpt = typer.Option(64, "--batch-size", help="Encoder batch size.")
NoDownloadOpt = typer.Option(False, "--no-download", help="Never try to download a missing dataset.")
DropUnknownOpt = typer.Option(False, "--drop-unknown", help="Drop qrels naming unknown queries/documents instead of failing.")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _info(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def search(
    dataset: str = typer.Option(..., "--dataset", "-d", help="BEIR dataset name or folder path."),
    split: str = SplitOpt,
    k: int = typer.Option(100, "--k", "-k", help="Documents to retrieve per query."),
    output: Path = typer.Option(..., "--output", "-o", help="TREC run file to write."),
    backend: str = typer.Option("exact", "--backend", help="exact, faiss-flat or faiss-hnsw."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    batch_size: int = BatchOpt,
    data_dir: Optional[str] = DataDirOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    no_download: bool = NoDownloadOpt,
    drop_unknown: bool = DropUnknownOpt,
) -> None:
    """Base retrieval with the frozen encoder; writes a TREC run (corpus embeddings are cached)."""
    from .data import load_dataset
    from .encode import Encoder, EncoderConfig, encode_corpus, encode_queries
    from .evaluate import hits_to_run, write_run
    from .index import search as first_stage

    try:
        start = time.perf_counter()
        data = load_dataset(dataset, data_dir, cache_dir, not no_download, drop_unknown)
        queries = data.split(split)
        encoder = Encoder(EncoderConfig(**({"model": model} if model else {}), precision=precision), device, batch_size)
        docs = encode_corpus(encoder, data.corpus, cache_dir)
        hits = first_stage(encode_queries(encoder, queries, cache_dir), docs, k, backend)
        write_run(output, hits_to_run(queries.ids, data.corpus.ids, hits.indices, hits.scores), tag="base")
    except IMRNNError as err:
        _fail(err)
    _info(f"wrote {output}: {len(queries)} queries x {k} in {time.perf_counter() - start:.1f}s")


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", "-r", help="TREC run file to score."),
    dataset: Optional[str] = DatasetOpt,
    qrels: Optional[Path] = typer.Option(None, "--qrels", help="Qrels file (BEIR TSV or TREC) instead of --dataset."),
    split: str = SplitOpt,
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second run: adds a paired test against --run."),
    measures: str = typer.Option(",".join(("nDCG@10", "R@10", "R@100", "RR@10", "AP", "P@10")), "--measures", help="Comma-separated ir-measures names."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
    data_dir: Optional[str] = DataDirOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    no_download: bool = NoDownloadOpt,
) -> None:
    """Score a TREC run against qrels with pytrec_eval (optionally against a second run)."""
    from .data import load_dataset, read_qrels
    from .evaluate import evaluate_run, evaluated_queries, paired_test, per_query, read_run

    try:
        if (dataset is None) == (qrels is None):
            raise IMRNNError("Give exactly one of --dataset NAME (with --split) or --qrels FILE.")
        judgements = read_qrels(qrels) if qrels else load_dataset(dataset, data_dir, cache_dir, not no_download).split(split).qrels
        names = [m.strip() for m in measures.split(",") if m.strip()]
        main_run = read_run(run)
        result: dict = {"metrics": evaluate_run(main_run, judgements, names), "queries": len(evaluated_queries(judgements))}
        if compare is not None:
            other = read_run(compare)
            result["compare"] = {"run": str(compare), "metrics": evaluate_run(other, judgements, names)}
            a, b = per_query(main_run, judgements, names), per_query(other, judgements, names)
            result["p_value"] = {m: paired_test(a[m], b[m]) for m in names}
    except IMRNNError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_metrics(result, run, compare)


def _print_metrics(result: dict, run: Path, compare: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['queries']} queries")
    table.add_column("measure")
    table.add_column(run.name, justify="right")
    if compare is not None:
        table.add_column(compare.name, justify="right")
        table.add_column("t-test p", justify="right")
        table.add_column("perm. p", justify="right")
    for name, value in result["metrics"].items():
        row = [name, f"{value:.4f}"]
        if compare is not None:
            test = result["p_value"][name]
            row += [f"{result['compare']['metrics'][name]:.4f}", f"{test['t_test']:.3g}", f"{test['randomization']:.3g}"]
        table.add_row(*row)
    Console().print(table)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
