"""The `imrnn` command: one thin sub-command per pipeline stage, plus `run` for the whole pipeline.

Every command is a client of the library: `run` and `train` call `imrnn.workflow.run_pipeline`, `evaluate
--checkpoint` calls `imrnn.workflow.evaluate`. Options for the configuration dataclasses (`EncoderConfig`,
`IMRNNConfig`, `TrainConfig`) are generated from their field declarations (`imrnn.config.setting`), so a
field's default and help text live in one place. Heavy modules are imported inside the commands, so
`imrnn --help` does not pay for torch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

from .config import EncoderConfig, IMRNNConfig, TrainConfig, command_line_fields
from .errors import ConfigError, IMRNNError
from .store.config import StoreConfig

if TYPE_CHECKING:
    from .data import Dataset

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}
PathType = click.Path(path_type=Path)


def _fail(err: Exception) -> NoReturn:
    click.secho(f"error: {err}", fg="red", err=True)
    raise click.exceptions.Exit(2)


def _info(message: str) -> None:
    click.echo(message, err=True)


def config_options(cls: type, prefix: str) -> Callable[[Callable], Callable]:
    """A decorator adding one option per command-line field of the config class `cls`, named `<prefix>__<field>`
    (so fields of different classes never collide); `config_from(cls, prefix, params)` rebuilds the values."""

    def decorate(command: Callable) -> Callable:
        for f in reversed(command_line_fields(cls)):
            meta = f.metadata
            flag = meta["flag"] or f"--{f.name.replace('_', '-')}"
            decls = [f"{prefix}__{f.name}", flag] + ([meta["short"]] if meta["short"] else [])
            if f.type == "bool":
                if "/" not in flag:
                    decls[1] = f"{flag}/--no-{flag[2:]}"
                option = click.option(*decls, default=f.default, show_default=True, help=meta["help"])
            else:
                option = click.option(*decls, type=_TYPES[str(f.type)], default=f.default, show_default=True, help=meta["help"])
            command = option(command)
        return command

    return decorate


def config_from(cls: type, prefix: str, params: dict[str, Any], **derived: Any) -> Any:
    """The config `cls` from a command's generated options (popped from `params`) and the fields it derives."""
    given = {f.name: params.pop(f"{prefix}__{f.name}") for f in command_line_fields(cls)}
    return cls(**given, **derived)


# --------------------------------------------------------------------------- options shared by several commands

dataset_option = click.option("--dataset", "-d", default=None, help="BEIR dataset name (searched on the data path) or folder path.")
data_dir_option = click.option("--data-dir", envvar="IMRNN_DATA_DIR", default=None, help="Folder(s) holding BEIR datasets, ':'-separated [env: IMRNN_DATA_DIR].")
cache_dir_option = click.option("--cache-dir", envvar="IMRNN_CACHE_DIR", type=PathType, default=None,
                                help="Cache for embeddings and downloads [env: IMRNN_CACHE_DIR; default: ~/.cache/imrnn].")
split_option = click.option("--split", "-s", default="test", show_default=True, help="Qrels split to use (a file name in qrels/, e.g. test).")


def _resolved_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`--device auto` -> cuda or cpu; a device this torch cannot use fails here, before any work."""
    from .encode import resolve_device

    try:
        return resolve_device(value)
    except ConfigError as err:
        _fail(err)


device_option = click.option("--device", default="auto", show_default=True, callback=_resolved_device,
                             help="torch device: auto (the GPU where torch sees one, else the CPU), cpu, cuda, cuda:1 ...")
batch_option = click.option("--batch-size", type=int, default=None,
                            help="Encoder batch size [default: 32 in bf16, 64 in fp32, the fastest measured].")
no_download_option = click.option("--no-download", is_flag=True, help="Never try to download a missing dataset.")
drop_unknown_option = click.option("--drop-unknown", is_flag=True, help="Drop qrels naming unknown queries/documents instead of failing.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _shared(*options: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imrnn")
def app() -> None:
    """IMRNN: interpretable adapters for dense retrieval."""


# --------------------------------------------------------------------------- search


@app.command()
@click.option("--dataset", "-d", default=None, help="BEIR dataset name or folder path (or give --embeddings).")
@split_option
@click.option("--k", "-k", default=100, show_default=True, help="Documents to retrieve per query.")
@click.option("--output", "-o", type=PathType, required=True, help="TREC run file to write.")
@click.option("--backend", default="exact", show_default=True, help="exact, faiss-flat or faiss-hnsw.")
@config_options(EncoderConfig, "encoder")
@_shared(device_option, batch_option, data_dir_option, cache_dir_option, no_download_option, drop_unknown_option)
@click.option("--embeddings", type=PathType, default=None, help="Search precomputed corpus embeddings instead of a dataset: a float32 (N, d) .npy file, memory-mapped (e.g. a cache entry's embeddings.npy).")
@click.option("--ids", type=PathType, default=None, help="With --embeddings: the N document ids in row order, one per line or a JSON list (e.g. ids.json).")
@click.option("--query-embeddings", type=PathType, default=None, help="With --embeddings: a float32 (Q, d) .npy file of query embeddings.")
@click.option("--query-ids", type=PathType, default=None, help="With --embeddings: the Q query ids in row order, one per line or a JSON list.")
@click.option("--store", default=None, help="Search a vector store filled by `imrnn index` (with --checkpoint): milvus:./NAME.db, "
              "milvus:http://HOST:19530, qdrant:./FOLDER or qdrant:http://HOST:6333; the store's top-K is re-ranked by the adapter.")
@click.option("--checkpoint", "-c", type=PathType, default=None, help="With --store: the checkpoint the collection was indexed with.")
@click.option("--base-output", type=PathType, default=None, help="With --store: also write the store's own (frozen) ranking here.")
@config_options(StoreConfig, "store")
def search(**params: Any) -> None:
    """Base retrieval with the frozen encoder; writes a TREC run (corpus embeddings are cached).

    With --embeddings/--ids/--query-embeddings/--query-ids it searches precomputed embeddings instead (no model is
    loaded; the corpus is memory-mapped and read in chunks, so it may be larger than RAM with the exact backend)."""
    from .data import load_dataset
    from .encode import encode_queries
    from .evaluate import hits_to_run, write_run
    from .workspace import Workspace

    start, output, k = time.perf_counter(), params["output"], params["k"]
    if params["store"] is not None or params["checkpoint"] is not None:
        _search_store(params, start)
        return
    try:
        encoder_config = config_from(EncoderConfig, "encoder", params)
        given = {"--embeddings": params["embeddings"], "--ids": params["ids"], "--query-embeddings": params["query_embeddings"],
                 "--query-ids": params["query_ids"]}
        if any(v is not None for v in given.values()):
            if params["dataset"] is not None or any(v is None for v in given.values()):
                raise IMRNNError(
                    "Searching precomputed embeddings needs all of --embeddings, --ids, --query-embeddings and --query-ids, "
                    f"and no --dataset (missing: {', '.join(f for f, v in given.items() if v is None) or 'none'})."
                )
            count = _search_embeddings(*given.values(), k, params["backend"], output)
        else:
            if params["dataset"] is None:
                raise IMRNNError("Give --dataset NAME (or --embeddings with --ids, --query-embeddings and --query-ids).")
            dataset = load_dataset(params["dataset"], params["data_dir"], params["cache_dir"], not params["no_download"],
                                   params["drop_unknown"])
            queries = dataset.split(params["split"])  # a bad split fails before anything is encoded
            workspace = Workspace.open(dataset, encoder_config, k, params["backend"], cache_dir=params["cache_dir"],
                                       device=params["device"], batch_size=params["batch_size"], log=_info)
            hits = workspace.search(encode_queries(workspace.encoder, queries, workspace.cache_dir))
            write_run(output, hits_to_run(queries.ids, workspace.dataset.corpus.ids, hits.indices, hits.scores), tag="base")
            count = len(queries)
    except IMRNNError as err:
        _fail(err)
    _info(f"wrote {output}: {count} queries x {k} in {time.perf_counter() - start:.1f}s")


def _search_embeddings(embeddings: Path, ids: Path, query_embeddings: Path, query_ids: Path, k: int, backend: str,
                       output: Path) -> int:
    """`imrnn search` over precomputed embeddings: memory-mapped corpus, ids validated against the row counts."""
    import numpy as np

    from .data import read_ids
    from .evaluate import hits_to_run, write_run
    from .index import open_embeddings, search as first_stage

    docs = open_embeddings(embeddings, "corpus")
    doc_ids = np.array(read_ids(ids, len(docs), "document"), dtype=object)
    queries = open_embeddings(query_embeddings, "query")
    qids = read_ids(query_ids, len(queries), "query")
    hits = first_stage(np.array(queries), docs, k, backend)
    write_run(output, hits_to_run(qids, doc_ids, hits.indices, hits.scores), tag="base")
    return len(qids)


def _search_store(params: dict[str, Any], start: float) -> None:
    """`imrnn search --store URI --checkpoint CKPT`: the store's top-K for the split's queries, re-ranked by the adapter
    from the stored vectors (`imrnn.retriever.StoreRetriever`), as a TREC run (and the store's own ranking)."""
    from .data import load_dataset
    from .encode import encode_queries
    from .evaluate import write_run
    from .retriever import IMRNNRetriever

    output, k = params["output"], params["k"]
    try:
        store_config = config_from(StoreConfig, "store", params)
        if params["store"] is None or params["checkpoint"] is None:
            raise IMRNNError("--store and --checkpoint go together: the collection's vectors were projected by a checkpoint.")
        if params["dataset"] is None or params["embeddings"] is not None:
            raise IMRNNError("--store searches the queries of --dataset NAME (with --split); --embeddings is not used with it.")
        queries = load_dataset(params["dataset"], params["data_dir"], params["cache_dir"], not params["no_download"],
                               params["drop_unknown"]).split(params["split"])
        with IMRNNRetriever.connect(params["checkpoint"], params["store"], params["device"], store_config, candidates=k,
                                    batch_size=params["batch_size"], cache_dir=params["cache_dir"]) as retriever:
            rankings = retriever.search_embeddings(encode_queries(retriever.encoder, queries, params["cache_dir"]), k)
        write_run(output, {q: dict(zip(r.ids, r.scores.tolist())) for q, r in zip(queries.ids, rankings)}, tag="imrnn")
        if params["base_output"] is not None:
            write_run(params["base_output"], {q: dict(zip(r.ids, r.base_scores.tolist())) for q, r in zip(queries.ids, rankings)},
                      tag="base")
    except (IMRNNError, ImportError) as err:
        _fail(err)
    _info(f"wrote {output}: {len(queries)} queries, the store's top-{k} re-ranked, in {time.perf_counter() - start:.1f}s")


# --------------------------------------------------------------------------- index


@app.command()
@click.option("--store", required=True, help="Where to write: milvus:./NAME.db (Milvus Lite, embedded), milvus:http://HOST:19530 "
              "(server or cluster), qdrant:./FOLDER (Qdrant local mode) or qdrant:http://HOST:6333.")
@click.option("--checkpoint", "-c", type=PathType, required=True, help="Checkpoint whose adapter projects the documents.")
@dataset_option
@click.option("--reproject", is_flag=True, help="Re-project the stored embeddings for --checkpoint (a new adapter, same encoder); "
              "nothing is re-encoded and --dataset is not needed.")
@click.option("--recreate", is_flag=True, help="Delete the collection first and index anew (e.g. after changing the encoder).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Encode with Ray Data actors: --ray alone starts a local Ray here; --ray ADDRESS joins a cluster (e.g. auto, "
                   "ray://HEAD:10001; every node needs imrnn installed).")
@click.option("--ray-actors", default=2, show_default=True, help="With --ray: encoder actors (one CPU each, or one GPU with --device cuda).")
@config_options(StoreConfig, "store")
@_shared(device_option, batch_option, data_dir_option, cache_dir_option, no_download_option, drop_unknown_option)
def index(**params: Any) -> None:
    """Write a dataset's corpus into a vector store as adapter-ready records (frozen embedding + projected vector).

    Idempotent and resumable: documents are upserted by id in batches, and progress is recorded in the collection, so
    re-running a killed run finishes the job without duplicates; re-running a finished one does nothing."""
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .encode import Encoder
    from .indexing import index_corpus
    from .store.base import open_store

    try:
        store_config = config_from(StoreConfig, "store", params)
        if params["dataset"] is None and not params["reproject"]:
            raise IMRNNError("Give --dataset NAME: the corpus to index (or --reproject to re-project what the collection holds).")
        checkpoint = load_checkpoint(params["checkpoint"], params["device"])
        encoder = Encoder(checkpoint.encoder, params["device"], params["batch_size"])
        corpus = None if params["reproject"] else load_dataset(
            params["dataset"], params["data_dir"], params["cache_dir"], not params["no_download"], params["drop_unknown"]).corpus
        with open_store(params["store"], store_config) as store:
            report = index_corpus(store, checkpoint.model, encoder, corpus, str(params["checkpoint"]), params["cache_dir"],
                                  params["ray_address"], params["ray_actors"], params["reproject"], params["recreate"])
    except (IMRNNError, ImportError) as err:
        _fail(err)
    _info(f"{report.action}: {report.documents} documents in {report.collection!r} of {report.uri} ({report.written} written"
          f"{f', resumed after {report.resumed_from}' if report.resumed_from and report.written else ''}) in {report.seconds:.1f}s")


# --------------------------------------------------------------------------- evaluate


@app.command()
@click.option("--run", "-r", "run_file", type=PathType, default=None, help="TREC run file to score.")
@click.option("--checkpoint", "-c", type=PathType, default=None, help="Evaluate a trained adapter (base vs adapted) instead of a run.")
@click.option("--output", "-o", type=PathType, default=None, help="With --checkpoint: also write the adapted TREC run here.")
@click.option("--k", "-k", default=100, show_default=True, help="With --checkpoint: first-stage candidates to re-rank.")
@device_option
@dataset_option
@click.option("--qrels", type=PathType, default=None, help="Qrels file (BEIR TSV or TREC) instead of --dataset.")
@split_option
@click.option("--compare", type=PathType, default=None, help="A second run: adds a paired test against --run.")
@click.option("--measures", default="nDCG@10,R@10,R@100,RR@10,AP,P@10", show_default=True, help="Comma-separated ir-measures names.")
@json_option
@_shared(data_dir_option, cache_dir_option, no_download_option)
def evaluate(run_file: Path | None, checkpoint: Path | None, output: Path | None, k: int, device: str, dataset: str | None,
             qrels: Path | None, split: str, compare: Path | None, measures: str, as_json: bool, data_dir: str | None,
             cache_dir: Path | None, no_download: bool) -> None:
    """Score a TREC run against qrels with pytrec_eval (optionally against a second run), or a checkpoint."""
    from .data import load_dataset, read_qrels
    from .evaluate import evaluate_run, evaluated_queries, paired_test, per_query, read_run

    if checkpoint is not None:
        _evaluate_checkpoint(checkpoint, dataset, split, k, output, as_json, device, data_dir, cache_dir, no_download)
        return
    try:
        if run_file is None:
            raise IMRNNError("Give --run FILE (a TREC run) or --checkpoint DIR (a trained adapter).")
        if (dataset is None) == (qrels is None):
            raise IMRNNError("Give exactly one of --dataset NAME (with --split) or --qrels FILE.")
        judgements = read_qrels(qrels) if qrels else load_dataset(dataset, data_dir, cache_dir, not no_download).split(split).qrels
        names = [m.strip() for m in measures.split(",") if m.strip()]
        main_run = read_run(run_file)
        result: dict = {"metrics": evaluate_run(main_run, judgements, names), "queries": len(evaluated_queries(judgements))}
        if compare is not None:
            other = read_run(compare)
            result["compare"] = {"run": str(compare), "metrics": evaluate_run(other, judgements, names)}
            a, b = per_query(main_run, judgements, names), per_query(other, judgements, names)
            result["p_value"] = {m: paired_test(a[m], b[m]) for m in names}
    except IMRNNError as err:
        _fail(err)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_metrics(result, run_file, compare)


def _evaluate_checkpoint(checkpoint: Path, dataset: str | None, split: str, k: int, output: Path | None, as_json: bool,
                         device: str, data_dir: str | None, cache_dir: Path | None, no_download: bool) -> None:
    """Base vs adapted for a checkpoint on one split of a dataset; unseen-relevant = w.r.t. all other splits."""
    from .checkpoint import load_checkpoint
    from .evaluate import write_run
    from .workflow import SplitPlan, Workspace, evaluate as evaluate_adapter

    try:
        if dataset is None:
            raise IMRNNError("--checkpoint needs --dataset NAME to evaluate on.")
        ckpt = load_checkpoint(checkpoint, device)
        workspace = Workspace.open(dataset, ckpt.encoder, k, data_dir=data_dir, cache_dir=cache_dir,
                                   download=not no_download, device=device, log=_info)
        if workspace.dimension != ckpt.model_config.embedding_dim:
            raise IMRNNError(f"Encoder gives {workspace.dimension}-d embeddings; the checkpoint expects {ckpt.model_config.embedding_dim}.")
        report = evaluate_adapter(ckpt.model, workspace, SplitPlan.holdout(workspace.dataset, split))
        if output is not None:
            write_run(output, report.adapted_run, tag="imrnn")
    except IMRNNError as err:
        _fail(err)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report.to_dict())


def _print_metrics(result: dict, run: Path, compare: Path | None) -> None:
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


# --------------------------------------------------------------------------- train and run


def _fractions(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """`--split-fractions 0.7,0.15,0.15` -> (0.7, 0.15, 0.15); `imrnn.data.random_splits` checks the values."""
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated numbers such as 0.7,0.15,0.15, got {value!r}.") from None


def _training_command(default_dataset: str | None, test_help: str) -> Callable[[Callable], Callable]:
    """The options of `train` and `run`: data and encoder, splits, output, and every model and training field."""
    return _shared(
        click.option("--dataset", "-d", default=default_dataset, show_default=default_dataset is not None,
                     help="BEIR dataset name or folder path (or give --pairs)."),
        click.option("--pairs", type=PathType, default=None,
                     help="Train on your own pairs instead of a dataset: JSONL, CSV or TSV rows of query, doc_id (or document "
                          "text), optional grade and query_id."),
        click.option("--corpus", type=PathType, default=None,
                     help="With --pairs: the documents, JSONL ({_id, title, text}) or CSV/TSV with a header row."),
        click.option("--test-pairs", type=PathType, default=None, help="With --pairs: held-out pairs to evaluate on."),
        click.option("--output", "-o", type=PathType, default=None,
                     help="Checkpoint folder to write [default: <cache>/checkpoints/<dataset>-seed<seed>; with --folds K, "
                          "the folder of the fold checkpoints, default ...-seed<seed>-<K>folds]."),
        click.option("--train-split", default="train", show_default=True, help="Split whose queries train the adapter."),
        click.option("--validation-split", default="auto", show_default=True,
                     help="'auto' (dev if present, else carve), 'carve', 'disjoint', or a split name."),
        click.option("--test-split", default="test", show_default=True, help=test_help),
        click.option("--folds", type=click.IntRange(min=0), default=0, show_default=True,
                     help="K-fold cross-validation over the queries of --test-split (with --pairs: the pairs), validation carved "
                          "from the training folds; reports the union of the test folds, one checkpoint per fold."),
        click.option("--split-fractions", default=None, callback=_fractions, metavar="TRAIN,VAL,TEST",
                     help="One seeded random train/validation/test split of the queries of --test-split (with --pairs: the "
                          "pairs), e.g. 0.7,0.15,0.15."),
        json_option,
        click.option("--resume", is_flag=True, help="Continue an interrupted training from its last finished epoch (state in <output>.state/)."),
        config_options(IMRNNConfig, "model"),
        config_options(TrainConfig, "train"),
        config_options(EncoderConfig, "encoder"),
        device_option, batch_option, data_dir_option, cache_dir_option, no_download_option, drop_unknown_option,
    )


@app.command()
@_training_command(None, "Split evaluated after training (skipped if absent).")
def train(**params: Any) -> None:
    """Train IMRNN adapters on a dataset's training queries, evaluate on the test split, save a checkpoint."""
    _train_command(params, require_test=False)


@app.command()
@_training_command("scifact", "Split to evaluate on.")
def run(**params: Any) -> None:
    """The whole pipeline: encode (or reuse the cache) -> base top-K -> train adapters -> evaluate base vs adapted."""
    _train_command(params, require_test=True)


def _train_command(params: dict[str, Any], require_test: bool) -> None:
    """`train` and `run`: configs from the generated options, then `imrnn.workflow.run_pipeline` (one split plan)
    or `imrnn.workflow.cross_validate` (`--folds`)."""
    from .pairs import PAIRS_SPLIT
    from .workflow import SplitPlan, Workspace, cross_validate, default_checkpoint_dir, run_pipeline

    try:
        train_config = config_from(TrainConfig, "train", params)
        square = params["model__working_dim"] is None  # only a square projection can start at the identity
        model_config = config_from(IMRNNConfig, "model", params, identity_init=square)
        encoder_config = config_from(EncoderConfig, "encoder", params)
        folds, fractions, test_split = params["folds"], params["split_fractions"], params["test_split"]
        resplit = bool(folds) or fractions is not None  # plans made from one query set, not the dataset's splits
        if folds and fractions is not None:
            raise IMRNNError("Give --folds K or --split-fractions TRAIN,VAL,TEST, not both.")
        if resplit and (params["train_split"] != "train" or params["validation_split"] != "auto"):
            raise IMRNNError("--folds and --split-fractions make their own training and validation queries from one query "
                             "set; drop --train-split and --validation-split (the validation share is --validation-fraction).")
        dataset = _training_data(params, resplit)
        seed = train_config.seed
        if resplit:  # bad splits fail before encoding
            pool = dataset.split(PAIRS_SPLIT if params["pairs"] is not None else test_split)
            plans = (SplitPlan.kfold(pool, folds, train_config.validation_fraction, seed) if folds
                     else [SplitPlan.random(pool, fractions, seed)])
        else:
            if require_test and test_split not in dataset.splits:
                raise IMRNNError(f"Dataset {dataset.name!r} has no split {test_split!r} to evaluate on; pass --test-split NAME, "
                                 "cross-validate with --folds K or --split-fractions (or, with --pairs, give --test-pairs).")
            plans = [SplitPlan.official(dataset, params["train_split"], params["validation_split"], test_split,
                                        train_config.validation_fraction, seed)]
        workspace = Workspace.open(dataset, encoder_config, train_config.candidates, cache_dir=params["cache_dir"],
                                   device=params["device"], batch_size=params["batch_size"], log=_info)
        if folds:
            _info(f"{dataset.name}: {len(dataset.corpus)} documents; {folds} folds over {len(pool)} queries")
            target = params["output"] or default_checkpoint_dir(workspace, seed, folds)
            report = cross_validate(workspace, plans, train_config, model_config, target, params["device"], params["resume"],
                                    log=_info).union
        else:
            plan = plans[0]
            _info(f"{dataset.name}: {len(dataset.corpus)} documents; train {len(plan.train)} / validation {len(plan.validation)} "
                  f"queries")
            report, target = run_pipeline(workspace, plan, train_config, model_config, params["output"], params["device"],
                                          params["resume"], log=_info)
    except IMRNNError as err:
        _fail(err)
    result = report.to_dict() if report is not None else {}
    if params["as_json"]:
        click.echo(json.dumps(result, indent=2))
    elif result:
        _print_report(result)
    _info(f"fold checkpoints and cross_validation.json saved in {target}" if folds else f"checkpoint saved to {target}")


def _training_data(params: dict[str, Any], resplit: bool) -> "Dataset":
    """The `Dataset` of `train`/`run`: a BEIR dataset (`--dataset`) or your own pairs (`--pairs`, `imrnn.pairs`)."""
    from click.core import ParameterSource

    from .data import load_dataset
    from .pairs import load_pairs

    if params["pairs"] is None:
        if params["corpus"] is not None or params["test_pairs"] is not None:
            raise IMRNNError("--corpus and --test-pairs go with --pairs FILE (your own training pairs).")
        if params["dataset"] is None:
            raise IMRNNError("Give --dataset NAME (a BEIR dataset) or --pairs FILE (your own (query, document) pairs).")
        return load_dataset(params["dataset"], params["data_dir"], params["cache_dir"], not params["no_download"],
                            params["drop_unknown"])
    if click.get_current_context().get_parameter_source("dataset") is not ParameterSource.DEFAULT:
        raise IMRNNError("Give --dataset NAME or --pairs FILE, not both.")
    if resplit and params["test_pairs"] is not None:
        raise IMRNNError("--test-pairs fixes the test queries, while --folds / --split-fractions split the pairs themselves; "
                         "give one or the other.")
    return load_pairs(params["pairs"], params["corpus"], params["test_pairs"])


def _print_report(report: dict) -> None:
    """Base vs adapted as a table, with the paired test, wins/losses and the unseen-relevant subset."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.get('split', 'test')}: {report['queries']} queries, top-{report.get('k', '?')} re-ranked")
    for column in ("measure", "base", "adapted", "delta", "paired t p"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for name, base in report["base"].items():
        adapted = report["adapted"][name]
        p = report["p_value"].get(name)
        table.add_row(name, f"{base:.4f}", f"{adapted:.4f}", f"{adapted - base:+.4f}", "" if p is None else f"{p:.2g}")
    console = Console()
    console.print(table)
    console.print(f"queries improved / worsened on nDCG@10: {report['improved']} / {report['worsened']}")
    unseen = report["unseen_relevant"]
    if unseen["queries"]:
        console.print(
            f"unseen-relevant subset ({unseen['queries']} queries whose relevant documents no training query has): "
            f"nDCG@10 {unseen['base']['nDCG@10']:.4f} -> {unseen['adapted']['nDCG@10']:.4f}"
        )
    else:
        console.print("unseen-relevant subset: empty (every test query has a relevant document seen in training)")


# --------------------------------------------------------------------------- explain


@app.command()
@click.option("--checkpoint", "-c", type=PathType, required=True, help="Checkpoint folder written by `imrnn train`.")
@dataset_option
@split_option
@click.option("--query-id", "-q", default=None, help="Query of --dataset/--split to explain.")
@click.option("--query", default=None, help="Free-text query to explain (with --documents).")
@click.option("--documents", type=PathType, default=None, help="JSONL candidates for --query: one {\"_id\", \"title\"?, \"text\"} per line.")
@click.option("--faithfulness", is_flag=True, help="Run the deletion test over the whole split instead.")
@click.option("--n", default=3, show_default=True, help="Deletion test: query words deleted per pair.")
@click.option("--draws", default=10, show_default=True, help="Deletion test: random deletions averaged per pair.")
@click.option("--top", default=10, show_default=True, help="Show the adapted and the base top-N candidates.")
@click.option("--k", "-k", default=100, show_default=True, help="First-stage candidates the adapter re-ranks (K).")
@click.option("--concepts", default=10, show_default=True, help="Concepts per list.")
@click.option("--doc-words", default=1, show_default=True, help="Documents given word attributions (most promoted first; ~0.15 s each).")
@click.option("--vocabulary", default="encoder", show_default=True,
              help="Concept vocabulary: encoder (tokens through the full encoder, cached) or input (word-embedding matrix).")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation (or deletion report) as JSON.")
@click.option("--html", "html_out", type=PathType, default=None, help="Also write a self-contained HTML report here.")
@click.option("--plots", type=PathType, default=None, help="Also write rank_shift.png and concepts.png into this folder (needs imrnn[plots]).")
@_shared(device_option, data_dir_option, cache_dir_option, no_download_option)
def explain(checkpoint: Path, dataset: str | None, split: str, query_id: str | None, query: str | None, documents: Path | None,
            faithfulness: bool, n: int, draws: int, top: int, k: int, concepts: int, doc_words: int, vocabulary: str,
            as_json: bool, html_out: Path | None, plots: Path | None, device: str, data_dir: str | None,
            cache_dir: Path | None, no_download: bool) -> None:
    """Explain a checkpoint's re-ranking of one query (score parts, concepts, word attributions), or test faithfulness."""
    from .explain import Explainer, explain_dataset_query, read_documents, split_deletion_test

    try:
        if faithfulness and dataset is None:
            raise IMRNNError("--faithfulness runs over a split: give --dataset NAME (and --split).")
        if not faithfulness and (query_id is None) == (query is None):
            raise IMRNNError("Give --query-id QID (with --dataset) or --query TEXT (with --documents FILE), or --faithfulness.")
        if query is not None and documents is None:
            raise IMRNNError("--query needs --documents FILE: a JSONL file of the candidate documents.")
        if query_id is not None and dataset is None:
            raise IMRNNError("--query-id needs --dataset NAME (and --split) to look the query up.")
        explainer = Explainer.from_checkpoint(checkpoint, device, vocabulary=vocabulary, cache_dir=cache_dir, progress=True)
        if query is not None:
            ids, texts = read_documents(documents)
            result = explainer.explain(query, ids, texts, top=top, concepts=concepts, doc_words=doc_words, k=k)
        else:
            from .workspace import Workspace

            workspace = Workspace.open(dataset, explainer.encoder, k, data_dir=data_dir, cache_dir=cache_dir,
                                       download=not no_download)
            if faithfulness:
                result = split_deletion_test(explainer, workspace, split, n=n, draws=draws, top=top)
            else:
                result = explain_dataset_query(explainer, workspace, split, query_id, top, concepts, doc_words)
        if not faithfulness:
            from .report import save_plots, write_html

            if html_out is not None:
                _info(f"wrote {write_html(result, html_out, top)}")
            if plots is not None:
                _info("wrote " + ", ".join(str(p) for p in save_plots(result, plots, top)))
    except (IMRNNError, ImportError) as err:
        _fail(err)
    if as_json:
        click.echo(result.to_json(indent=2))
    elif faithfulness:
        from .report import deletion_markdown

        click.echo(deletion_markdown(result, f"{dataset} {split}, checkpoint {checkpoint}"))
    else:
        _print_explanation(result, top)


def _print_explanation(exp: Any, top: int) -> None:
    """Ranking before/after with the exact score split, then the query's concepts and its most telling words."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{exp.query_id or 'query'}: {exp.query}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="adapted = base + projection + modulation (A_q) + refinement (A_d); ★ most promoted")
    for column in ("after", "move", "before", "document", "base", "adapted", "proj.", "A_q", "A_d"):
        table.add_column(column, justify="left" if column == "document" else "right", no_wrap=True)
    for c in exp.candidates:
        move = f"[green]▲{c.rank_shift}[/]" if c.rank_shift > 0 else f"[red]▼{-c.rank_shift}[/]" if c.rank_shift < 0 else "="
        mark = " ★" if c.doc_id == exp.promoted else ""
        table.add_row(str(c.adapted_rank), move, str(c.base_rank), c.doc_id + mark, f"{c.base_score:.3f}", f"{c.adapted_score:.3f}",
                      f"{c.projection:+.3f}", f"{c.modulation:+.3f}", f"{c.refinement:+.3f}")
    console.print(table, markup=True)
    fmt = lambda cs: ", ".join(f"{c.token} {c.weight:+.3f}" for c in cs[:8]) or "none"  # noqa: E731
    console.print(f"query pulled toward: {fmt(exp.pulled_toward)}", markup=False)
    console.print(f"query pushed from:   {fmt(exp.pushed_from)}", markup=False)
    if exp.promoted:
        cand = exp.candidate(exp.promoted)
        strongest = sorted(exp.query_words, key=lambda w: -w.weight)[:5]
        console.print(f"★ {cand.doc_id} ({cand.base_rank} → {cand.adapted_rank}) moved toward: {fmt(cand.toward)}", markup=False)
        console.print("  query words that lift it most: " + ", ".join(f"{w.text} {w.weight:+.3f}" for w in strongest), markup=False)
        if cand.doc_words:
            best = sorted(cand.doc_words, key=lambda w: -w.weight)[:8]
            console.print("  its own words that lift it most: " + ", ".join(f"{w.text} {w.weight:+.4f}" for w in best), markup=False)


# --------------------------------------------------------------------------- serve


@app.command()
@click.option("--checkpoint", "-c", type=PathType, required=True, help="Checkpoint folder written by `imrnn train`.")
@click.option("--dataset", "-d", default=None, help="BEIR dataset whose corpus is indexed for /search and ids (name or folder path).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="TCP port (0 picks a free one; the log names it).")
@click.option("--k", "-k", default=100, show_default=True, help="First-stage candidates re-ranked per query (K).")
@click.option("--vocabulary", default="encoder", show_default=True,
              help="Concept vocabulary of /explain: encoder (built once, cached) or input (word-embedding matrix).")
@click.option("--threads", type=int, default=None, help="torch threads for model work [default: one per core; 1 is faster on a busy, shared machine].")
@click.option("--log-level", default="info", show_default=True, help="uvicorn log level: critical, error, warning, info, debug.")
@_shared(device_option, data_dir_option, cache_dir_option, no_download_option)
def serve(checkpoint: Path, dataset: str | None, host: str, port: int, k: int, vocabulary: str, threads: int | None,
          log_level: str, device: str, data_dir: str | None, cache_dir: Path | None, no_download: bool) -> None:
    """Serve a checkpoint over HTTP (FastAPI + uvicorn): /search, /rerank, /explain, /health, /openapi.json."""
    try:
        from .serve import serve as run_service

        run_service(checkpoint, dataset, host, port, candidates=k, vocabulary=vocabulary, data_dir=data_dir,
                    cache_dir=cache_dir, download=not no_download, device=device, threads=threads, log_level=log_level,
                    log=_info)
    except (IMRNNError, ImportError) as err:
        _fail(err)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
