"""Frozen, validated configuration dataclasses (torch-free, so the CLI can build flags cheaply)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

LOSSES = ("listwise", "margin")
GATE_RULES = ("abstain", "one-standard-error", "best")
FEEDBACK_RULES = ("cross-validated", "in-sample")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def setting(default: Any, help: str, flag: str | None = None, short: str | None = None, cli: bool = True) -> Any:
    """A configuration field declared once: its default, its help text and its command-line flag.

    The flag defaults to `--field-name`; `cli=False` marks fields the workflow derives (the encoder's dimension,
    the calibrated gate) rather than a user's choice. `imrnn.cli` builds its options from these declarations."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "short": short, "cli": cli})


def command_line_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class a user sets from the command line, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str}


def check_types(cls: type, values: dict) -> dict:
    """`values` for `cls(**values)` (e.g. read from a JSON file), refusing any value whose type does not match its
    field's annotation (a string for an int, a bool for a float, NaN or Infinity for a float)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, allowed = values[f.name], [t.strip() for t in str(f.type).split("|")]
        if not any(t in _JSON_TYPES for t in allowed) or (value is None and "None" in allowed):
            continue
        ok = any(isinstance(value, _JSON_TYPES[t]) and (t == "bool" or not isinstance(value, bool)) for t in allowed if t in _JSON_TYPES)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise ConfigError(f"{cls.__name__}.{f.name} must be {' or '.join(allowed)}, got {type(value).__name__} {shown}.")
    return values


@dataclass(frozen=True)
class IMRNNConfig:
    """Architecture of the adapters. `working_dim=None` means square (= embedding_dim).

    The novelty gate (`memory_size` > 0 and a `gate_threshold`) blends adapted and frozen scores per query by
    how close the query is to a training query: g = sigmoid((max cos(q, memory) - threshold) / gate_width),
    score = g * adapted + (1 - g) * frozen. Training calibrates it on validation; 0 = no gate.
    """

    embedding_dim: int = setting(384, "Dimension of the frozen encoder's embeddings.", cli=False)  # from the encoder
    working_dim: int | None = setting(None, "Working-space dimension (default: square, identity-initialised).")
    identity_init: bool = setting(True, "Start the square projection at the identity.", cli=False)  # = square
    train_projection: bool = setting(True, "Train the shared projection (--freeze-projection keeps it at its start).",
                                     flag="--train-projection/--freeze-projection")
    hidden_dim: int = setting(128, "Hidden width of each adapter MLP.")
    dropout: float = setting(0.1, "Dropout inside the adapters.")
    use_query_adapter: bool = setting(True, "Use the query adapter A_q (--no-query-adapter: ablation).",
                                      flag="--query-adapter/--no-query-adapter")
    use_doc_adapter: bool = setting(True, "Use the document adapter A_d (--no-doc-adapter: ablation).",
                                    flag="--doc-adapter/--no-doc-adapter")
    feedback_docs: int = setting(5, "Top-m candidates the document adapter reads (feedback size); with --feedback, "
                                    "tuning replaces it when Rocchio feedback is kept.")
    feedback_weight: float = setting(0.0, "Rocchio weight beta: the refined query starts as norm(q + beta * mean of the "
                                          "top-m candidates); `workflow.train` tunes it on its queries.", cli=False)
    iterations: int = setting(1, "Modulate/refine rounds (the refined query conditions the documents again).")
    memory_size: int = setting(0, "Training queries kept for the novelty gate.", cli=False)  # set by calibration
    gate_threshold: float | None = setting(None, "Novelty-gate threshold.", cli=False)  # set by calibration
    gate_width: float = setting(0.05, "Width of the novelty gate's sigmoid (cosine units).")

    def __post_init__(self) -> None:
        if self.memory_size < 0 or self.gate_width <= 0:
            raise ConfigError(f"memory_size must be >= 0 and gate_width > 0, got {self.memory_size}, {self.gate_width}.")
        if (self.memory_size > 0) != (self.gate_threshold is not None):
            raise ConfigError("A novelty gate needs both memory_size > 0 and a gate_threshold (or neither).")
        if self.embedding_dim < 1 or self.hidden_dim < 1:
            raise ConfigError(f"embedding_dim and hidden_dim must be positive, got {self.embedding_dim}, {self.hidden_dim}.")
        if self.working_dim is not None and self.working_dim < 1:
            raise ConfigError(f"working_dim must be positive or None (square), got {self.working_dim}.")
        if self.identity_init and self.working_dim not in (None, self.embedding_dim):
            raise ConfigError(
                f"identity_init needs a square projection, but working_dim={self.working_dim} != embedding_dim="
                f"{self.embedding_dim}. Set working_dim to None or identity_init to False."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.feedback_docs < 1:
            raise ConfigError(f"feedback_docs (m) must be at least 1, got {self.feedback_docs}.")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}.")
        if not (math.isfinite(self.feedback_weight) and self.feedback_weight >= 0):
            raise ConfigError(f"feedback_weight (Rocchio beta) must be a finite number >= 0, got {self.feedback_weight}.")

    @property
    def dim(self) -> int:
        return self.working_dim or self.embedding_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "IMRNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"Unknown IMRNNConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**check_types(cls, values))


@dataclass(frozen=True)
class TrainConfig:
    """How the adapters are trained; every field maps to an `imrnn train` flag."""

    loss: str = setting("margin", "Training loss: listwise (softmax over the candidate list) or margin (hinge vs hard negatives).")
    epochs: int = setting(30, "Maximum epochs.")
    batch_size: int = setting(32, "Queries per training step.", flag="--train-batch-size")
    lr: float = setting(1e-3, "AdamW learning rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    temperature: float = setting(0.05, "Softmax temperature of the listwise loss.")
    margin: float = setting(0.1, "Hinge margin of the margin loss.")
    hard_negatives: int = setting(16, "Hardest candidates used as negatives per positive (margin loss).")
    relevant_negative_weight: float = setting(0.0, "Extra weight, as a negative of the margin loss, of a candidate that is "
                                                   "relevant to another training query (3: it counts 4 times), so the "
                                                   "adapter gains less by favouring the documents training saw as relevant "
                                                   "whatever the query; off by default, see the README.")
    query_balanced: bool = setting(False, "Margin loss: average each training query's pairs first, then the queries (each "
                                          "query counts once, as in nDCG@10 and the listwise loss), instead of pooling a "
                                          "batch's pairs (a query with many positives counts more); by default validation "
                                          "chooses (--choose-query-balanced), this flag imposes it.",
                                   flag="--query-balanced/--pair-balanced")
    choose_query_balanced: bool = setting(True, "Train the adapters twice, with the pooled and with the query-balanced margin "
                                                "loss, and keep the query-balanced ones only if their out-of-fold validation "
                                                "nDCG@10 beats the pooled ones' by more than one paired standard error "
                                                "(twice the training time; --no-choose-query-balanced: the pooled loss alone). "
                                                "Only with the margin loss, and not when --query-balanced imposes it.",
                                          flag="--choose-query-balanced/--no-choose-query-balanced")
    bm25_negatives: int = setting(0, "Extra BM25 negatives (bm25s) appended to each training candidate list "
                                         "(they count in --loss listwise; the margin loss uses only the hardest negatives).")
    candidates: int = setting(100, "First-stage candidates the adapter re-ranks (K).", flag="--k", short="-k")
    max_added_positives: int = setting(0, "Positives the first stage missed that are put into a training list.")
    validation_fraction: float = setting(0.15, "Share of training queries carved out for validation.")
    validation_folds: int = setting(3, "Train this many adapters from the same start, each early-stopped on a different "
                                       "part of the training + validation queries and trained on the rest, and keep the "
                                       "mean of their weights (every judged query trains, early stopping's noise "
                                       "averages out); 1: one adapter, early-stopped on the validation split.")
    patience: int = setting(6, "Stop after this many epochs without a better validation nDCG@10.")
    ema_half_life: float = setting(1.0, "Validate and keep an exponential moving average of the weights, with this "
                                        "half-life in epochs (0: the raw weights of each epoch).")
    plateau_average: bool = setting(True, "Keep the mean weights of the epochs validation cannot tell from the best one "
                                          "(within one paired standard error), not the best epoch alone (--best-epoch).",
                                    flag="--plateau-average/--best-epoch")
    novelty_gate: bool = setting(False, "Calibrate a novelty gate on validation (blend towards the frozen score for queries "
                                        "unlike any training query); off by default, see the README.",
                                 flag="--novelty-gate/--no-novelty-gate")
    gate_rule: str = setting("abstain", "How validation chooses the gate: abstain (a gate only if it beats no gate by more "
                                        "than one standard error), one-standard-error (the most conservative within one "
                                        "SE of the best) or best.")
    feedback: bool = setting(True, "Start from Rocchio feedback tuned on the training and validation queries "
                                   "(--no-feedback: from the frozen retriever).", flag="--feedback/--no-feedback")
    feedback_rule: str = setting("cross-validated", "How feedback tuning judges its gain: cross-validated (each query scored by the "
                                               "option chosen without it) or in-sample (the best option's own mean).")
    keep_only_if_better: bool = setting(False, "Keep the trained adapter only if it beats its starting point (the tuned "
                                              "feedback) on validation by more than one standard error "
                                              "(default --always-keep: keep it whenever early stopping found a better epoch).",
                                        flag="--keep-only-if-better/--always-keep")
    min_queries: int = setting(30, "Fewer judged training + validation queries than this: train nothing, use the "
                                   "non-learned feedback (or the frozen retriever) and say so.")
    seed: int = setting(42, "Seed for initialisation, shuffling and the validation carve-out.")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        for name in ("epochs", "batch_size", "candidates", "patience", "hard_negatives", "validation_folds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("bm25_negatives", "max_added_positives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not all(math.isfinite(v) for v in (self.lr, self.temperature, self.margin, self.weight_decay)):
            raise ConfigError("lr, temperature, margin and weight_decay must be finite numbers (not NaN or Inf).")
        if self.lr <= 0 or self.temperature <= 0 or self.margin < 0 or self.weight_decay < 0:
            raise ConfigError("lr and temperature must be > 0; margin and weight_decay >= 0.")
        if self.gate_rule not in GATE_RULES:
            raise ConfigError(f"gate_rule must be one of {GATE_RULES}, got {self.gate_rule!r}.")
        if not (math.isfinite(self.ema_half_life) and self.ema_half_life >= 0):
            raise ConfigError(f"ema_half_life must be a finite number of epochs >= 0, got {self.ema_half_life}.")
        if self.feedback_rule not in FEEDBACK_RULES:
            raise ConfigError(f"feedback_rule must be one of {FEEDBACK_RULES}, got {self.feedback_rule!r}.")
        if not (math.isfinite(self.relevant_negative_weight) and self.relevant_negative_weight >= 0):
            raise ConfigError(f"relevant_negative_weight must be a finite number >= 0, got {self.relevant_negative_weight}.")
        if self.relevant_negative_weight and self.loss != "margin":
            raise ConfigError("relevant_negative_weight weighs the negatives of the margin loss; use it with loss=margin "
                              f"(got loss={self.loss!r}) or set it to 0.")
        if self.query_balanced and self.loss != "margin":
            raise ConfigError("query_balanced averages the margin loss per query, and the listwise loss already counts "
                              f"each query once; use it with loss=margin (got loss={self.loss!r}) or leave it off.")
        if self.validation_folds > 1 and (self.novelty_gate or self.keep_only_if_better):
            raise ConfigError("The novelty gate and the acceptance test are chosen on validation queries that no adapter "
                              f"trained on, and with validation_folds={self.validation_folds} every one of them trains an "
                              "adapter: use them with --validation-folds 1.")
        if self.min_queries < 0:
            raise ConfigError(f"min_queries must be >= 0, got {self.min_queries}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")

    @property
    def chooses_loss_averaging(self) -> bool:
        """Whether training chooses between the pooled and the query-balanced margin loss on validation: asked for,
        and not settled by the loss (listwise counts each query once) or by `query_balanced`."""
        return self.choose_query_balanced and self.loss == "margin" and not self.query_balanced

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config recorded as `values`; a record from before `validation_folds` existed trained one adapter, one
        from before `choose_query_balanced` existed the pooled margin loss alone."""
        values = {"validation_folds": 1, "choose_query_balanced": False, **values}
        known = {f.name for f in dataclasses.fields(cls)}
        if set(values) - known:
            raise ConfigError(f"Unknown TrainConfig fields {sorted(set(values) - known)}; known: {sorted(known)}.")
        return cls(**check_types(cls, values))


@dataclass(frozen=True)
class EncoderConfig:
    """What determines an embedding: the model, the prefixes and the numeric precision."""

    model: str = setting(DEFAULT_MODEL, "sentence-transformers model name or path (the default MiniLM is bundled).",
                         short="-m")
    query_prefix: str = setting("", "Text put before every query (e.g. 'query: ' for E5 models).")
    passage_prefix: str = setting("", "Text put before every passage (e.g. 'passage: ' for E5 models).")
    precision: str = setting("auto", "Encoding precision: auto (bf16 where the CPU or GPU computes bf16 natively, "
                                     "else fp32), fp32, or bf16 (autocast).")
    max_length: int | None = setting(None, "Truncate texts to this many tokens (default: the model's own limit).")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be positive, got {self.max_length}.")
