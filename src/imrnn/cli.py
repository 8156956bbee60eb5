"""The `imrnn` command: one thin sub-command per pipeline stage, plus `run` for the whole pipeline."""


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
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="BEIR dataset name or folder path (or give --embeddings)."),
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
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="Search precomputed corpus embeddings instead of a dataset: a float32 (N, d) .npy file, memory-mapped (e.g. a cache entry's embeddings.npy)."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="With --embeddings: the N document ids in row order, one per line or a JSON list (e.g. ids.json)."),
    query_embeddings: Optional[Path] = typer.Option(None, "--query-embeddings", help="With --embeddings: a float32 (Q, d) .npy file of query embeddings."),
    query_ids: Optional[Path] = typer.Option(None, "--query-ids", help="With --embeddings: the Q query ids in row order, one per line or a JSON list."),
) -> None:
    """Base retrieval with the frozen encoder; writes a TREC run (corpus embeddings are cached).

    With --embeddings/--ids/--query-embeddings/--query-ids it searches precomputed embeddings instead (no model is
    loaded; the corpus is memory-mapped and read in chunks, so it may be larger than RAM with the exact backend)."""
    from .data import load_dataset
    from .encode import Encoder, EncoderConfig, encode_corpus, encode_queries
    from .evaluate import hits_to_run, write_run
    from .index import search as first_stage

    try:
        start = time.perf_counter()
        given = {"--embeddings": embeddings, "--ids": ids, "--query-embeddings": query_embeddings, "--query-ids": query_ids}
        if any(v is not None for v in given.values()):
            if dataset is not None or any(v is None for v in given.values()):
                raise IMRNNError(
                    "Searching precomputed embeddings needs all of --embeddings, --ids, --query-embeddings and --query-ids, "
                    f"and no --dataset (missing: {', '.join(f for f, v in given.items() if v is None) or 'none'})."
                )
            count = _search_embeddings(embeddings, ids, query_embeddings, query_ids, k, backend, output)
        else:
            if dataset is None:
                raise IMRNNError("Give --dataset NAME (or --embeddings with --ids, --query-embeddings and --query-ids).")
            data = load_dataset(dataset, data_dir, cache_dir, not no_download, drop_unknown)
            queries = data.split(split)
            encoder = Encoder(EncoderConfig(**({"model": model} if model else {}), precision=precision), device, batch_size)
            docs = encode_corpus(encoder, data.corpus, cache_dir)
            hits = first_stage(encode_queries(encoder, queries, cache_dir), docs, k, backend)
            write_run(output, hits_to_run(queries.ids, data.corpus.ids, hits.indices, hits.scores), tag="base")
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


@app.command()
def evaluate(
    run: Optional[Path] = typer.Option(None, "--run", "-r", help="TREC run file to score."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Evaluate a trained adapter (base vs adapted) instead of a run."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --checkpoint: also write the adapted TREC run here."),
    k: int = typer.Option(100, "--k", "-k", help="With --checkpoint: first-stage candidates to re-rank."),
    device: str = DeviceOpt,
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
    """Score a TREC run against qrels with pytrec_eval (optionally against a second run), or a checkpoint."""
    from .data import load_dataset, read_qrels
    from .evaluate import evaluate_run, evaluated_queries, paired_test, per_query, read_run

    if checkpoint is not None:
        _evaluate_checkpoint(checkpoint, dataset, split, k, output, as_json, device, data_dir, cache_dir, no_download)
        return
    try:
        if run is None:
            raise IMRNNError("Give --run FILE (a TREC run) or --checkpoint DIR (a trained adapter).")
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


def _evaluate_checkpoint(checkpoint: Path, dataset: Optional[str], split: str, k: int, output: Optional[Path],
                         as_json: bool, device: str, data_dir: Optional[str], cache_dir: Optional[Path], no_download: bool) -> None:
    """Base vs adapted for a checkpoint on one split of a dataset; unseen-relevant = w.r.t. all other splits."""
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .encode import Encoder
    from .evaluate import write_run
    from .pipeline import Prepared, evaluate_adapter

    try:
        if dataset is None:
            raise IMRNNError("--checkpoint needs --dataset NAME to evaluate on.")
        ckpt = load_checkpoint(checkpoint, device)
        data = load_dataset(dataset, data_dir, cache_dir, not no_download)
        queries = data.split(split)
        encoder = Encoder(ckpt.encoder, device)
        prepared = Prepared.build(data, encoder, cache_dir, k)
        if prepared.doc_embs.shape[1] != ckpt.model_config.embedding_dim:
            raise IMRNNError(f"Encoder gives {prepared.doc_embs.shape[1]}-d embeddings; the checkpoint expects {ckpt.model_config.embedding_dim}.")
        seen = {q: docs for name, qrels in data.qrels.items() if name != split for q, docs in qrels.items()}
        report, adapted_run = evaluate_adapter(ckpt.model, prepared, queries, seen)
        report["split"] = split
        if output is not None:
            write_run(output, adapted_run, tag="imrnn")
    except IMRNNError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


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


def _encoder(model: Optional[str], precision: str, device: str, batch_size: int):
    from .encode import Encoder, EncoderConfig

    return Encoder(EncoderConfig(**({"model": model} if model else {}), precision=precision), device, batch_size)


def _train_and_report(args: dict) -> tuple[dict, Path]:
    """Shared by `train` and `run`: encode (or reuse), train, evaluate on the test split, save the checkpoint.

    The training state is saved after every epoch in `<output>.state/` (removed once the checkpoint is written),
    so a killed run continues with `--resume` and ends with the same weights as an uninterrupted one."""
    from .checkpoint import save_checkpoint
    from .data import default_cache_dir, load_dataset
    from .pipeline import Prepared, checkpoint_from, evaluate_adapter, fit, validation_split as split_validation
    from .resume import discard_state, has_state

    cache_dir = args["cache_dir"]
    data = load_dataset(args["dataset"], args["data_dir"], cache_dir, not args["no_download"], args["drop_unknown"])
    encoder = _encoder(args["model"], args["precision"], args["device"], args["batch_size"])
    prepared = Prepared.build(data, encoder, cache_dir, args["k"])
    model_config, train_config = _build_configs(args["flags"], args["k"], prepared.doc_embs.shape[1])
    train_split, test_split = args["train_split"], args["test_split"]
    train_q, val_q = split_validation(data, train_split, args["validation_split"], train_config.validation_fraction, train_config.seed)
    _info(f"{data.name}: {len(data.corpus)} documents; train {len(train_q)} / validation {len(val_q)} queries")
    target = args["output"] or Path(cache_dir or default_cache_dir()) / "checkpoints" / f"{data.name}-seed{train_config.seed}"
    state_dir = target.with_name(target.name + ".state")
    resume = args.get("resume", False)
    if not resume and has_state(state_dir):
        _info(f"found the state of an interrupted training in {state_dir}; starting over (pass --resume to continue it)")
    result = fit(prepared, train_q, val_q, model_config, train_config, args["device"], state_dir=state_dir, resume=resume)
    gate = (result.gate or {}).get("threshold")
    _info(f"trained in {result.seconds:.1f}s; best epoch {result.best_epoch}, validation nDCG@10 {result.best_validation:.4f}; "
          f"novelty gate threshold {gate if gate is not None else 'none'}")
    report = None
    if test_split is not None and test_split in data.splits:
        train_qrels = {**data.qrels[train_split], **val_q.qrels}
        report, _ = evaluate_adapter(result.model, prepared, data.split(test_split), train_qrels)
        report["split"] = test_split
    save_checkpoint(checkpoint_from(result, prepared, train_config, train_q, val_q, report), target)
    discard_state(state_dir)
    return report or {}, target


def _build_configs(flags: dict, k: int, embedding_dim: int):
    """Map the training flags one-to-one onto IMRNNConfig and TrainConfig."""
    from .config import IMRNNConfig, TrainConfig

    model_fields = {"working_dim", "hidden_dim", "dropout", "feedback_docs", "iterations"}
    model_config = IMRNNConfig(
        embedding_dim=embedding_dim,
        identity_init=flags["working_dim"] is None,
        use_query_adapter=not flags["no_query_adapter"],
        use_doc_adapter=not flags["no_doc_adapter"],
        **{k_: v for k_, v in flags.items() if k_ in model_fields},
    )
    skip = model_fields | {"no_query_adapter", "no_doc_adapter", "no_novelty_gate", "train_batch_size"}
    train_config = TrainConfig(batch_size=flags["train_batch_size"], candidates=k, novelty_gate=not flags["no_novelty_gate"],
                               **{k_: v for k_, v in flags.items() if k_ not in skip})
    return model_config, train_config


def _training_options(func):
    """Decorator adding one CLI flag per IMRNNConfig / TrainConfig field (defaults come from the dataclasses)."""
    import inspect

    from .config import IMRNNConfig, TrainConfig

    m, t = IMRNNConfig(), TrainConfig()
    extra = {
        "seed": (int, t.seed, "Seed for initialisation, shuffling and the validation carve-out."),
        "loss": (str, t.loss, "Training loss: listwise (softmax over the candidate list) or margin (hinge vs hard negatives)."),
        "epochs": (int, t.epochs, "Maximum epochs."),
        "lr": (float, t.lr, "AdamW learning rate."),
        "weight_decay": (float, t.weight_decay, "AdamW weight decay."),
        "temperature": (float, t.temperature, "Softmax temperature of the listwise loss."),
        "margin": (float, t.margin, "Hinge margin of the margin loss."),
        "hard_negatives": (int, t.hard_negatives, "Hardest candidates used as negatives per positive (margin loss)."),
        "bm25_negatives": (int, t.bm25_negatives, "Extra BM25 negatives (bm25s) appended to each training candidate list."),
        "max_added_positives": (int, t.max_added_positives, "Positives the first stage missed that are put into a training list."),
        "validation_fraction": (float, t.validation_fraction, "Share of training queries carved out for validation."),
        "patience": (int, t.patience, "Stop after this many epochs without a better validation nDCG@10."),
        "train_batch_size": (int, t.batch_size, "Queries per training step."),
        "working_dim": (Optional[int], m.working_dim, "Working-space dimension (default: square, identity-initialised)."),
        "hidden_dim": (int, m.hidden_dim, "Hidden width of each adapter MLP."),
        "dropout": (float, m.dropout, "Dropout inside the adapters."),
        "feedback_docs": (int, m.feedback_docs, "Top-m candidates the document adapter reads (feedback size)."),
        "iterations": (int, m.iterations, "Modulate/refine rounds (the refined query conditions the documents again)."),
        "no_query_adapter": (bool, False, "Ablation: disable the query adapter A_q."),
        "no_doc_adapter": (bool, False, "Ablation: disable the document adapter A_d."),
        "no_novelty_gate": (bool, False, "Do not calibrate the novelty gate (always use the adapted score)."),
    }
    signature = inspect.signature(func)
    params = [p for p in signature.parameters.values() if p.name != "flags"]
    for name, (kind, default, help_text) in extra.items():
        option = typer.Option(default, f"--{name.replace('_', '-')}", help=help_text)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))

    def wrapper(**kwargs):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in extra}
        return func(**kwargs, flags=own)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__name__, wrapper.__doc__ = func.__name__, func.__doc__
    return wrapper


CheckpointOutOpt = typer.Option(None, "--output", "-o", help="Checkpoint folder to write [default: <cache>/checkpoints/<dataset>-seed<seed>].")
TrainSplitOpt = typer.Option("train", "--train-split", help="Split whose queries train the adapter.")
ValidationSplitOpt = typer.Option("auto", "--validation-split", help="'auto' (dev if present, else carve), 'carve', 'disjoint', or a split name.")
CandidatesOpt = typer.Option(100, "--k", "-k", help="First-stage candidates the adapter re-ranks (K).")
ReportJsonOpt = typer.Option(False, "--json", help="Print the evaluation report as JSON instead of a table.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted training from its last finished epoch (state in <output>.state/).")


@app.command()
@_training_options
def train(
    dataset: str = typer.Option(..., "--dataset", "-d", help="BEIR dataset name or folder path."),
    output: Optional[Path] = CheckpointOutOpt,
    train_split: str = TrainSplitOpt,
    validation_split: str = ValidationSplitOpt,
    test_split: Optional[str] = typer.Option("test", "--test-split", help="Split evaluated after training (skipped if absent)."),
    k: int = CandidatesOpt,
    as_json: bool = ReportJsonOpt,
    model: Optional[str] = ModelOpt,
    precision: str = PrecisionOpt,
    device: str = DeviceOpt,
    batch_size: int = BatchOpt,
    data_dir: Optional[str] = DataDirOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    no_download: bool = NoDownloadOpt,
    drop_unknown: bool = DropUnknownOpt,
    resume: bool = ResumeOpt,
    flags: dict = None,  # type: ignore[assignment]
) -> None:
    """Train IMRNN adapters on a dataset's training queries, evaluate on the test split, save a checkpoint."""
    _train_command(locals(), require_test=False)


@app.command()
@_training_options
def run(
    dataset: str = typer.Option("scifact", "--dataset", "-d", help="BEIR dataset name or folder path."),
    output: Optional[Path] = CheckpointOutOpt,
    train_split: str = TrainSplitOpt,
    validation_split: str = ValidationSplitOpt,
    test_split: str = typer.Option("test", "--test-split", help="Split to evaluate on."),
    k: int = CandidatesOpt,
    as_json: bool = ReportJsonOpt,
    model: Optional[str] = ModelOpt,
    precision: str = PrecisionOpt,
    device: str = DeviceOpt,
    batch_size: int = BatchOpt,
    data_dir: Optional[str] = DataDirOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    no_download: bool = NoDownloadOpt,
    drop_unknown: bool = DropUnknownOpt,
    resume: bool = ResumeOpt,
    flags: dict = None,  # type: ignore[assignment]
) -> None:
    """The whole pipeline: encode (or reuse the cache) -> base top-K -> train adapters -> evaluate base vs adapted."""
    _train_command(locals(), require_test=True)


def _train_command(args: dict, require_test: bool) -> None:
    try:
        if require_test and args["test_split"] is None:
            raise IMRNNError("`imrnn run` needs a --test-split to evaluate on.")
        report, target = _train_and_report(args)
        if require_test and not report:
            raise IMRNNError(f"Dataset {args['dataset']!r} has no split {args['test_split']!r} to evaluate on; pass --test-split.")
    except IMRNNError as err:
        _fail(err)
    if args.get("as_json"):
        typer.echo(json.dumps(report, indent=2))
    elif report:
        _print_report(report)
    _info(f"checkpoint saved to {target}")


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


@app.command()
def explain(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Checkpoint folder written by `imrnn train`."),
    dataset: Optional[str] = DatasetOpt,
    split: str = SplitOpt,
    query_id: Optional[str] = typer.Option(None, "--query-id", "-q", help="Query of --dataset/--split to explain."),
    query: Optional[str] = typer.Option(None, "--query", help="Free-text query to explain (with --documents)."),
    documents: Optional[Path] = typer.Option(None, "--documents", help="JSONL candidates for --query: one {\"_id\", \"title\"?, \"text\"} per line."),
    faithfulness: bool = typer.Option(False, "--faithfulness", help="Run the deletion test over the whole split instead."),
    n: int = typer.Option(3, "--n", help="Deletion test: query words deleted per pair."),
    draws: int = typer.Option(10, "--draws", help="Deletion test: random deletions averaged per pair."),
    top: int = typer.Option(10, "--top", help="Show the adapted and the base top-N candidates."),
    k: int = typer.Option(100, "--k", "-k", help="First-stage candidates the adapter re-ranks (K)."),
    concepts: int = typer.Option(10, "--concepts", help="Concepts per list."),
    doc_words: int = typer.Option(1, "--doc-words", help="Documents given word attributions (most promoted first; ~0.15 s each)."),
    vocabulary: str = typer.Option("encoder", "--vocabulary", help="Concept vocabulary: encoder (tokens through the full encoder, cached) or input (word-embedding matrix)."),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation (or deletion report) as JSON."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report here."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Also write rank_shift.png and concepts.png into this folder (needs imrnn[plots])."),
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    no_download: bool = NoDownloadOpt,
) -> None:
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
            from .data import load_dataset
            from .pipeline import Prepared

            data = load_dataset(dataset, data_dir, cache_dir, not no_download)
            prepared = Prepared.build(data, explainer.encoder, cache_dir, k)
            if faithfulness:
                result = split_deletion_test(explainer, prepared, split, n=n, draws=draws, top=top)
            else:
                result = explain_dataset_query(explainer, prepared, split, query_id, top, concepts, doc_words)
        if not faithfulness:
            from .report import save_plots, write_html

            if html_out is not None:
                _info(f"wrote {write_html(result, html_out, top)}")
            if plots is not None:
                _info("wrote " + ", ".join(str(p) for p in save_plots(result, plots, top)))
    except (IMRNNError, ImportError) as err:
        _fail(err)
    if as_json:
        typer.echo(result.to_json(indent=2))
    elif faithfulness:
        from .report import deletion_markdown

        typer.echo(deletion_markdown(result, f"{dataset} {split}, checkpoint {checkpoint}"))
    else:
        _print_explanation(result, top)


def _print_explanation(exp, top: int) -> None:
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


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
