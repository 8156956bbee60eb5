"""The library's workflow from a dataset to an evaluated checkpoint: the one path `imrnn run` takes.

    workspace = Workspace.open("scifact")                       # dataset, frozen encoder, cached embeddings, K
    plan = SplitPlan.official(workspace.dataset, seed=42)       # train / validation / test and the "seen" qrels
    trained = train(workspace, plan, TrainConfig(seed=42))      # adapters: early stopping, novelty gate
    report = evaluate(trained.model, workspace, plan)           # base vs adapted on the same candidates
    save_checkpoint(checkpoint(trained, workspace, plan, report), "checkpoints/scifact")

`run_pipeline` does exactly these steps (plus resumable training state); `imrnn evaluate --checkpoint` is
`evaluate` under `SplitPlan.holdout`; `cross_validate` runs them once per `SplitPlan.kfold` fold and pools the test
folds (`imrnn run --folds`); `benchmarks/method.py` calls the same functions.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .candidates import RankingSet, ranking_set, select_queries
from .checkpoint import Checkpoint, save_checkpoint
from .config import IMRNNConfig, TrainConfig
from .data import Dataset, Qrels, QuerySet, carve_validation, default_cache_dir, kfold, random_splits
from .errors import ConfigError
from .evaluate import Run, clearly_better, evaluated_queries, hits_to_run, paired_test, per_query
from .feedback import feedback_ndcg, tune_feedback
from .files import atomic_write_json
from .model import IMRNN
from .workspace import Workspace
from .resume import discard_state, has_state
from .scoring import score_candidates, sort_by_score
from .train import TrainResult, keep_if_clearly_better, train_adapter, validation_values, weight_soup

REPORT_MEASURES = ("nDCG@10", "R@10", "RR@10", "R@100")
TRUSTED_QUERIES = 50  # fewer judged training + validation queries: the recipe warns that its figures are unreliable
_UNTESTED = ("R@100",)  # the first-stage ceiling: identical for base and adapted by construction


@dataclass(frozen=True)
class SplitPlan:
    """Which queries train, select (validation) and test a model, and the judgements it has seen.

    `seen` holds the qrels of the queries a model was trained or selected on; a test query none of whose relevant
    documents is relevant in `seen` is "unseen-relevant": there an adapter cannot lean on a learned prior over
    documents. This class is the only place that defines both."""

    train: QuerySet | None
    validation: QuerySet | None
    test: QuerySet | None
    seen: Qrels = field(repr=False)

    @classmethod
    def official(cls, dataset: Dataset, train_split: str = "train", validation: str = "auto",
                 test_split: str | None = "test", fraction: float = 0.15, seed: int = 42) -> "SplitPlan":
        """The dataset's own splits. `validation`: an official split name, 'carve' (a seeded `fraction` of the
        training queries), 'disjoint' (carved groups that share no relevant document) or 'auto' (dev if present,
        else carve). A missing `test_split` leaves `test` empty (training only)."""
        train_queries = dataset.split(train_split)
        if validation == "auto":
            validation = "dev" if "dev" in dataset.splits and train_split != "dev" else "carve"
        if validation in ("carve", "disjoint"):
            train_queries, validation_queries = carve_validation(train_queries, fraction, seed, disjoint=validation == "disjoint")
        else:
            validation_queries = dataset.split(validation)
        test = dataset.split(test_split) if test_split is not None and test_split in dataset.splits else None
        return cls(train_queries, validation_queries, test, {**train_queries.qrels, **validation_queries.qrels})

    @classmethod
    def kfold(cls, queries: QuerySet, folds: int = 5, fraction: float = 0.15, seed: int = 42) -> list["SplitPlan"]:
        """K plans over one query set: each fold tests once; validation is carved from the other folds."""
        plans = []
        for train_queries, test in kfold(queries, folds, seed=seed):
            fit, validation = carve_validation(train_queries, fraction, seed)
            plans.append(cls(fit, validation, test, {**fit.qrels, **validation.qrels}))
        return plans

    @classmethod
    def random(cls, queries: QuerySet, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), seed: int = 42) -> "SplitPlan":
        """One seeded train / validation / test split of one query set (the authors' protocol for test-only collections)."""
        fit, validation, test = random_splits(queries, fractions, seed)
        return cls(fit, validation, test, {**fit.qrels, **validation.qrels})

    @classmethod
    def holdout(cls, dataset: Dataset, split: str) -> "SplitPlan":
        """Evaluate a trained model on one split; every other split counts as seen."""
        seen = {q: docs for name, qrels in dataset.qrels.items() if name != split for q, docs in qrels.items()}
        return cls(None, None, dataset.split(split), seen)

    def validation_folds(self, folds: int, seed: int = 42) -> list["SplitPlan"]:
        """`folds` plans over this plan's training + validation queries, each validating on a different seeded part
        and training on the rest (the members of a weight soup); test queries and `seen` stay as they are."""
        if self.train is None or self.validation is None:
            raise ConfigError("This split plan has no training or validation queries to fold.")
        pooled = QuerySet("train+validation", self.train.ids + self.validation.ids, self.train.texts + self.validation.texts,
                          {**self.train.qrels, **self.validation.qrels})
        if len(pooled) < folds:
            raise ConfigError(f"{folds} validation folds need at least {folds} training and validation queries, this plan "
                              f"has {len(pooled)}: use --validation-folds 1 (or fewer folds).")
        return [SplitPlan(fit, validation, self.test, self.seen) for fit, validation in kfold(pooled, folds, seed)]

    def unseen_relevant(self, queries: QuerySet) -> list[str]:
        """Queries none of whose relevant documents is relevant to any seen query."""
        seen_docs = {d for docs in self.seen.values() for d, r in docs.items() if r > 0}
        return [q for q in queries.ids if not any(r > 0 and d in seen_docs for d, r in queries.qrels[q].items())]


@dataclass(frozen=True)
class Comparison:
    """Base vs adapted over one set of queries: means, paired tests and per-query wins and losses."""

    queries: int
    base: dict[str, float]
    adapted: dict[str, float]
    p_value: dict[str, float]
    randomization_p: dict[str, float]
    improved: int
    worsened: int

    @classmethod
    def of_runs(cls, base_run: Run, adapted_run: Run, qrels: Qrels, measures: tuple[str, ...] = REPORT_MEASURES) -> "Comparison":
        """Side-by-side means, paired t-test and randomisation p-values, improved/worsened counts on nDCG@10."""
        base, adapted = per_query(base_run, qrels, measures), per_query(adapted_run, qrels, measures)
        tests = {m: paired_test(base[m], adapted[m]) for m in measures if m not in _UNTESTED}
        delta = adapted["nDCG@10"] - base["nDCG@10"]
        return cls(len(delta), {m: float(v.mean()) for m, v in base.items()}, {m: float(v.mean()) for m, v in adapted.items()},
                   {m: t["t_test"] for m, t in tests.items()}, {m: t["randomization"] for m, t in tests.items()},
                   int((delta > 1e-9).sum()), int((delta < -1e-9).sum()))


@dataclass(frozen=True)
class EvaluationReport:
    """What `imrnn run` and `imrnn evaluate --checkpoint` print: base vs adapted on the same candidates, and the
    same comparison on the unseen-relevant queries (None when none or when nothing was seen)."""

    overall: Comparison
    k: int
    split: str | None
    unseen_relevant_queries: int
    unseen_relevant: Comparison | None
    adapted_run: Run = field(repr=False, compare=False)
    base_run: Run = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` output (its keys are pinned by a golden test: users parse them)."""
        unseen: dict[str, Any] = {"queries": self.unseen_relevant_queries, "base": None, "adapted": None}
        if self.unseen_relevant is not None:
            unseen.update(base=self.unseen_relevant.base, adapted=self.unseen_relevant.adapted, p_value=self.unseen_relevant.p_value)
        out: dict[str, Any] = {**dataclasses.asdict(self.overall), "k": self.k, "unseen_relevant": unseen}
        if self.split is not None:
            out["split"] = self.split
        return out


def train(workspace: Workspace, plan: SplitPlan, train_config: TrainConfig = TrainConfig(),
          model_config: IMRNNConfig | None = None, device: str = "cpu", progress: bool = True,
          state_dir: Path | None = None, resume: bool = False) -> TrainResult:
    """The recipe on `plan`: tune Rocchio feedback on the training and validation queries (the adapters' starting
    point), then train adapters from it (resumable with `state_dir`): with `validation_folds` > 1 (the default) one
    per fold of the training + validation queries, each early-stopped on its fold, their weights averaged; with 1, on
    `plan.train`, early-stopped on `plan.validation`. With `choose_query_balanced` (the default) this is done with the
    pooled and with the query-balanced margin loss, and the query-balanced adapters are kept only if out-of-fold
    validation clearly prefers them.

    With fewer than `train_config.min_queries` judged training and validation queries nothing is trained: the result
    is the tuned feedback alone (the frozen retriever where feedback does not clearly help). Optional steps, off by
    default: a novelty gate, and `keep_only_if_better` (drop an adapter not clearly better than its start on
    validation). `result.recipe` records every selection and why. `model_config` defaults to the default
    architecture; its embedding dimension is always the workspace's."""
    if plan.train is None or plan.validation is None:
        raise ConfigError("This split plan has no training or validation queries; build one with SplitPlan.official or .kfold.")
    start = time.perf_counter()
    model_config = dataclasses.replace(model_config or IMRNNConfig(), embedding_dim=workspace.dimension)
    doc_ids = workspace.dataset.corpus.ids
    plain_train, validation_set = workspace.ranking(plan.train), workspace.ranking(plan.validation)
    judged = len(evaluated_queries(plan.train.qrels)) + len(evaluated_queries(plan.validation.qrels))
    recipe: dict[str, Any] = {"judged_queries": judged, "min_queries": train_config.min_queries}
    if train_config.feedback:
        model_config, recipe["feedback"] = tune_feedback(model_config, [plain_train, validation_set], workspace.doc_embs, doc_ids,
                                                          rule=train_config.feedback_rule, seed=train_config.seed)
    if judged < train_config.min_queries:
        recipe.update(trained=False, reason=f"{judged} judged training and validation queries, fewer than "
                      f"{train_config.min_queries}: an adapter cannot be trusted here, so nothing was trained")
        score = float(feedback_ndcg(model_config, [validation_set], workspace.doc_embs, doc_ids).mean())
        return TrainResult(IMRNN(model_config).eval(), 0, score, [{"epoch": 0, "loss": None, "val_nDCG@10": score}],
                           time.perf_counter() - start, None, recipe)
    result = _train_adapters(workspace, plan, train_config, model_config, plain_train, validation_set, device, progress,
                             state_dir, resume)
    if train_config.chooses_loss_averaging:
        result, recipe["loss_averaging"] = _choose_loss_averaging(workspace, plan, train_config, model_config, plain_train,
                                                                  validation_set, result, device, progress, state_dir, resume)
    recipe["trained"] = True
    if train_config.keep_only_if_better:
        result.model, recipe["acceptance"] = keep_if_clearly_better(result.model, IMRNN(model_config).eval(), validation_set,
                                                                    workspace.doc_embs, doc_ids)
        if not recipe["acceptance"]["kept"]:
            recipe.update(trained=False, reason="the trained adapter was not better than its starting point on validation "
                                                "by more than one standard error, so the starting point is kept")
            result.gate = None
    if judged < TRUSTED_QUERIES:
        recipe["warning"] = (f"only {judged} judged training and validation queries: validation this small cannot show "
                             "small effects, so treat the adapter's gains here as unreliable")
    result.recipe, result.seconds = recipe, time.perf_counter() - start
    return result


def _train_adapters(workspace: Workspace, plan: SplitPlan, train_config: TrainConfig, model_config: IMRNNConfig,
                    plain_train: RankingSet, validation_set: RankingSet, device: str, progress: bool,
                    state_dir: Path | None, resume: bool) -> TrainResult:
    """One adapter early-stopped on `plan.validation`, or with `validation_folds` > 1 the weight soup of one adapter
    per validation fold of the training + validation queries (`SplitPlan.validation_folds`), each member resumable
    in its own state folder."""
    doc_embs, doc_ids = workspace.doc_embs, workspace.dataset.corpus.ids
    if train_config.validation_folds == 1:
        return train_adapter(model_config, train_config, doc_embs, doc_ids, _training_set(workspace, plan, train_config, plain_train),
                             validation_set, device=device, progress=progress, state_dir=state_dir, resume=resume)
    pooled = (plain_train, validation_set)  # the members' rankings are rows of these: no second corpus search
    members = [train_adapter(model_config, train_config, doc_embs, doc_ids,
                             _training_set(workspace, member, train_config, select_queries(pooled, member.train.ids)),
                             select_queries(pooled, member.validation.ids), device=device, progress=progress,
                             state_dir=None if state_dir is None else state_dir / f"member{i}", resume=resume)
               for i, member in enumerate(plan.validation_folds(train_config.validation_folds, train_config.seed))]
    return weight_soup(members)


QUERY_BALANCED_STATE = "query-balanced"  # the state folder, inside the run's, of the query-balanced training


def _choose_loss_averaging(workspace: Workspace, plan: SplitPlan, train_config: TrainConfig, model_config: IMRNNConfig,
                           plain_train: RankingSet, validation_set: RankingSet, pooled: TrainResult, device: str,
                           progress: bool, state_dir: Path | None, resume: bool) -> tuple[TrainResult, dict]:
    """`pooled` (adapters trained with the pooled margin loss) or the same training with the query-balanced loss,
    chosen on validation: the query-balanced adapters only if their out-of-fold values beat the pooled ones' by more
    than one paired standard error (the house rule where validation may not be able to tell), and a report."""
    balanced_config = dataclasses.replace(train_config, query_balanced=True, choose_query_balanced=False)
    balanced = _train_adapters(workspace, plan, balanced_config, model_config, plain_train, validation_set, device, progress,
                               None if state_dir is None else state_dir / QUERY_BALANCED_STATE, resume)
    values = {name: _out_of_fold_values(result, workspace, plan, train_config, plain_train, validation_set)
              for name, result in (("pooled", pooled), ("query-balanced", balanced))}
    keep_balanced = clearly_better(values["query-balanced"], values["pooled"])
    report = {"chosen": "query-balanced" if keep_balanced else "pooled", "queries": len(values["pooled"]),
              "rule": "the query-balanced loss only if its out-of-fold validation nDCG@10 beats the pooled loss's by "
                      "more than one paired standard error",
              "validation_nDCG@10": {name: float(v.mean()) for name, v in values.items()}}
    return (balanced if keep_balanced else pooled), report


def _out_of_fold_values(result: TrainResult, workspace: Workspace, plan: SplitPlan, train_config: TrainConfig,
                        plain_train: RankingSet, validation_set: RankingSet) -> np.ndarray:
    """Per-query validation nDCG@10 of what training kept, each query scored by the adapter early-stopped on it and
    not trained on it: a weight soup's member on its own fold (in the order of `plan.validation_folds`), else the one
    adapter on `plan.validation`."""
    doc_embs, doc_ids = workspace.doc_embs, workspace.dataset.corpus.ids
    if not result.members:
        return validation_values(result.model, validation_set, doc_embs, doc_ids)
    pooled = (plain_train, validation_set)
    folds = plan.validation_folds(train_config.validation_folds, train_config.seed)
    return np.concatenate([validation_values(member.model, select_queries(pooled, fold.validation.ids), doc_embs, doc_ids)
                           for member, fold in zip(result.members, folds)])


def _training_set(workspace: Workspace, plan: SplitPlan, train_config: TrainConfig, plain: RankingSet) -> RankingSet:
    """The training queries' candidate lists: the first stage's (`plain`, the rows of `plan.train`), plus the
    positives it missed and BM25 negatives when the config asks for them, built on `plain`'s rows (no second search,
    so the query embeddings are the very ones validation and search use)."""
    if not train_config.max_added_positives and not train_config.bm25_negatives:
        return plain
    corpus = workspace.dataset.corpus
    extra = None
    if train_config.bm25_negatives:
        from .negatives import bm25_negatives, relevance_matrix

        relevance = relevance_matrix(plain.query_ids, plain.qrels, corpus.ids)
        extra = bm25_negatives(corpus.passages(), plan.train.texts, relevance, train_config.bm25_negatives)
    return ranking_set(plain.query_ids, plain.query_embs, plain.candidates, plain.qrels, corpus.ids,
                       train_config.max_added_positives, extra)


def evaluate(model: IMRNN, workspace: Workspace, plan: SplitPlan) -> EvaluationReport:
    """Base vs adapted on `plan.test`'s first-stage candidates, with the unseen-relevant subset."""
    if plan.test is None:
        raise ConfigError("This split plan has no test queries to evaluate on.")
    test = plan.test
    data = workspace.ranking(test)
    doc_ids = workspace.dataset.corpus.ids
    base_run = hits_to_run(test.ids, doc_ids, data.candidates, workspace.frozen_scores(data))
    order, scores = sort_by_score(data.candidates, score_candidates(model, data.query_embs, workspace.doc_embs, data.candidates))
    adapted_run = hits_to_run(test.ids, doc_ids, order, scores)
    return _report(base_run, adapted_run, test.qrels, plan.unseen_relevant(test), workspace.k, test.name)


def _report(base_run: Run, adapted_run: Run, qrels: Qrels, unseen_ids: list[str], k: int, split: str) -> EvaluationReport:
    """Base vs adapted over `qrels`' queries, and over the unseen-relevant ones among them."""
    unseen = Comparison.of_runs(base_run, adapted_run, {q: qrels[q] for q in unseen_ids}) if unseen_ids else None
    return EvaluationReport(Comparison.of_runs(base_run, adapted_run, qrels), k, split, len(unseen_ids), unseen, adapted_run,
                            base_run)


def checkpoint(trained: TrainResult, workspace: Workspace, plan: SplitPlan, train_config: TrainConfig,
               report: EvaluationReport | None = None) -> Checkpoint:
    """A trained adapter with the metadata a checkpoint records (data fingerprint, seed, gate, metrics)."""
    metadata = {
        "library_version": __version__,
        "encoder_identity": workspace.encoder.identity,
        "encoder_precision": workspace.encoder.precision,  # what `auto` resolved to while training
        "data": {
            "dataset": workspace.dataset.name,
            "corpus_fingerprint": workspace.dataset.corpus.fingerprint(),
            "train_queries": len(plan.train) if plan.train is not None else 0,
            "validation_queries": len(plan.validation) if plan.validation is not None else 0,
            "candidates": workspace.k,
        },
        "seed": train_config.seed,
        "novelty_gate": trained.gate,
        "recipe": trained.recipe,
        "training": {"best_epoch": trained.best_epoch, "averaged_epochs": trained.averaged_epochs,
                     "seconds": round(trained.seconds, 2), "history": trained.history,
                     "parameters": trained.model.num_parameters(),
                     "members": [{"best_epoch": m.best_epoch, "averaged_epochs": m.averaged_epochs,
                                  "validation_nDCG@10": m.best_validation} for m in trained.members]},
        "metrics": {"validation": {"nDCG@10": trained.best_validation}, "test": report.to_dict() if report else None},
    }
    return Checkpoint(trained.model, workspace.encoder.config, train_config, metadata)


def default_checkpoint_dir(workspace: Workspace, seed: int, folds: int = 0) -> Path:
    """Where a checkpoint goes when no output folder is given: `<cache>/checkpoints/<dataset>-seed<seed>`
    (with `folds`, the folder of the fold checkpoints: `<cache>/checkpoints/<dataset>-seed<seed>-<folds>folds`)."""
    name = f"{workspace.dataset.name}-seed{seed}" + (f"-{folds}folds" if folds else "")
    return Path(workspace.cache_dir or default_cache_dir()) / "checkpoints" / name


def run_pipeline(workspace: Workspace, plan: SplitPlan, train_config: TrainConfig = TrainConfig(),
                 model_config: IMRNNConfig | None = None, output: Path | None = None, device: str = "cpu",
                 resume: bool = False, progress: bool = True, log: Callable[[str], None] = lambda _: None,
                 ) -> tuple[EvaluationReport | None, Path]:
    """Train, evaluate on `plan.test` (when it has one) and save the checkpoint; returns (report, checkpoint folder).

    The training state is saved after every epoch in `<output>.state/` (removed once the checkpoint is written),
    so a killed run continues with `resume=True` and ends with the same weights as an uninterrupted one."""
    target = Path(output) if output is not None else default_checkpoint_dir(workspace, train_config.seed)
    trained = _fit(workspace, plan, train_config, model_config, _state_dir(target), device, resume, progress, log)
    report = evaluate(trained.model, workspace, plan) if plan.test is not None else None
    _save(trained, workspace, plan, train_config, report, target)
    return report, target


def _state_dir(target: Path) -> Path:
    return target.with_name(target.name + ".state")


def _fit(workspace: Workspace, plan: SplitPlan, train_config: TrainConfig, model_config: IMRNNConfig | None,
         state_dir: Path | None, device: str, resume: bool, progress: bool, log: Callable[[str], None]) -> TrainResult:
    """`train`, resumable through `state_dir` (None: no saved state), logging its outcome."""
    if state_dir is not None and not resume and any(has_state(d) for d in (state_dir, *state_dir.rglob("*"))):
        log(f"found the state of an interrupted training in {state_dir}; starting over (pass --resume to continue it)")
    trained = train(workspace, plan, train_config, model_config, device, progress, state_dir, resume)
    feedback = trained.recipe.get("feedback")
    if feedback is not None and feedback["beta"]:
        log(f"feedback tuned on {feedback['queries']} training and validation queries: beta {feedback['beta']}, m {feedback['m']} "
            f"(nDCG@10 {feedback['nDCG@10']['frozen']:.4f} frozen -> {feedback['nDCG@10']['chosen']:.4f})")
    elif feedback is not None:
        best = feedback["best"]
        honest = best.get("cross-validated nDCG@10")
        judged = f", cross-validated {honest:.4f}" if honest is not None else ""
        beaten = (f"is not clearly beaten (best: beta {best['beta']}, m {best['m']}, {best['nDCG@10']:.4f}{judged})"
                  if best["beta"] else "is the best of the feedback options")
        log(f"no feedback: on {feedback['queries']} training and validation queries the frozen retriever's nDCG@10 "
            f"{feedback['nDCG@10']['frozen']:.4f} {beaten}")
    if trained.recipe.get("warning"):
        log(f"warning: {trained.recipe['warning']}")
    if not trained.recipe.get("trained", True):
        log(f"no trained adapter: {trained.recipe['reason']}")
        return trained
    averaging = trained.recipe.get("loss_averaging")
    if averaging is not None:
        scores = averaging["validation_nDCG@10"]
        log(f"margin loss averaged {'per query' if averaging['chosen'] == 'query-balanced' else 'over pooled pairs'}: "
            f"out-of-fold validation nDCG@10 on {averaging['queries']} queries, pooled {scores['pooled']:.4f}, "
            f"query-balanced {scores['query-balanced']:.4f} (query-balanced only if better by more than one standard error)")
    if trained.members:
        folds = len(trained.members)
        log(f"trained {folds} adapters{' per loss' if averaging else ''} in {trained.seconds:.1f}s, each early-stopped on "
            f"one of {folds} folds of the training and validation queries and trained on the others, and kept the mean of "
            "their weights")
        for i, member in enumerate(trained.members, 1):
            log(f"  adapter {i}: {_kept(member)}, validation nDCG@10 {member.best_validation:.4f} "
                f"(start {member.history[0]['val_nDCG@10']:.4f})")
        return trained
    gate = trained.gate and f"; novelty gate threshold {trained.gate['threshold'] or 'none'} ({trained.gate['rule']} rule)"
    log(f"trained in {trained.seconds:.1f}s; {_kept(trained)}, validation nDCG@10 "
        f"{trained.best_validation:.4f} (start {trained.history[0]['val_nDCG@10']:.4f}){gate or ''}")
    return trained


def _kept(trained: TrainResult) -> str:
    """Which weights one training kept: its best epoch, or the mean of the plateau's epochs."""
    epochs = trained.averaged_epochs
    if len(epochs) > 1:
        return f"best epoch {trained.best_epoch}, kept the mean of epochs {epoch_ranges(epochs)} (within one standard error of the best)"
    return f"best epoch {trained.best_epoch}, kept epoch {trained.best_epoch}"


def epoch_ranges(epochs: list[int]) -> str:
    """Sorted epoch numbers as ranges: [5, 6, 7, 10, 11] -> "5-7, 10-11"."""
    runs: list[list[int]] = []
    for epoch in epochs:
        if runs and epoch == runs[-1][-1] + 1:
            runs[-1].append(epoch)
        else:
            runs.append([epoch])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _save(trained: TrainResult, workspace: Workspace, plan: SplitPlan, train_config: TrainConfig,
          report: EvaluationReport | None, target: Path) -> None:
    """Write the checkpoint folder, then drop the training state it supersedes."""
    save_checkpoint(checkpoint(trained, workspace, plan, train_config, report), target)
    discard_state(_state_dir(target))


@dataclass(frozen=True)
class CrossValidation:
    """One model per fold, each tested on its own held-out queries, and the test folds pooled (`union`): the
    figure to report for a collection with a single split. `union.to_dict()` is `imrnn run --folds K --json`."""

    folds: list[EvaluationReport]
    union: EvaluationReport
    trained: list[TrainResult] = field(repr=False)
    checkpoints: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The union report and, per fold, its report with training facts (`cross_validation.json`)."""
        folds = [{**report.to_dict(), "best_epoch": fit.best_epoch, "averaged_epochs": fit.averaged_epochs,
                  "validation_nDCG@10": fit.best_validation, "train_seconds": round(fit.seconds, 2),
                  "checkpoint": str(self.checkpoints[i]) if self.checkpoints else None}
                 for i, (report, fit) in enumerate(zip(self.folds, self.trained))]
        return {"union": self.union.to_dict(), "folds": folds}


def cross_validate(workspace: Workspace, plans: Sequence[SplitPlan], train_config: TrainConfig = TrainConfig(),
                   model_config: IMRNNConfig | None = None, output: Path | None = None, device: str = "cpu",
                   resume: bool = False, progress: bool = True, log: Callable[[str], None] = lambda _: None,
                   ) -> CrossValidation:
    """Train and test once per plan (e.g. `SplitPlan.kfold`), then compare base and adapted over the union of the test
    folds; a query counts as unseen-relevant in the union when it is so for its own fold's model.

    With `output`, fold i's checkpoint goes to `<output>/fold-<i>` (resumable like `run_pipeline`) and the union and
    per-fold reports to `<output>/cross_validation.json`; without it nothing is written."""
    tests = [plan.test for plan in plans if plan.test is not None]
    if not plans or len(tests) != len(plans):
        raise ConfigError("Cross-validation needs at least one split plan, each with test queries (SplitPlan.kfold).")
    tested = [q for test in tests for q in test.ids]
    if len(set(tested)) != len(tested):
        raise ConfigError("The plans' test folds overlap; every query must be tested by exactly one fold (SplitPlan.kfold).")
    targets = [Path(output) / f"fold-{i}" for i in range(len(plans))] if output is not None else []
    folds, trained = [], []
    for i, (plan, test) in enumerate(zip(plans, tests)):
        log(f"fold {i + 1}/{len(plans)}: train {len(plan.train or [])} / validation {len(plan.validation or [])} / "
            f"test {len(test)} queries")
        fit = _fit(workspace, plan, train_config, model_config, _state_dir(targets[i]) if targets else None, device, resume,
                   progress, log)
        report = evaluate(fit.model, workspace, plan)
        if targets:
            _save(fit, workspace, plan, train_config, report, targets[i])
        log(f"fold {i + 1}/{len(plans)}: nDCG@10 {report.overall.base['nDCG@10']:.4f} -> {report.overall.adapted['nDCG@10']:.4f}")
        folds.append(report)
        trained.append(fit)
    qrels = {q: docs for test in tests for q, docs in test.qrels.items()}
    unseen = [q for plan, test in zip(plans, tests) for q in plan.unseen_relevant(test)]
    base = {q: docs for report in folds for q, docs in report.base_run.items()}
    adapted = {q: docs for report in folds for q, docs in report.adapted_run.items()}
    union = _report(base, adapted, qrels, unseen, workspace.k, f"union of {len(plans)} test folds")
    result = CrossValidation(folds, union, trained, targets)
    if output is not None:
        atomic_write_json(Path(output) / "cross_validation.json", result.to_dict())
    return result
