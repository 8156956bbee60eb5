"""Human-readable views of explanations: a self-contained HTML report, PNG plots and a markdown summary.

The HTML has no scripts and no external assets (inline CSS only), and every piece of text that comes from a
query, a document or a vocabulary goes through `html.escape`, so a document holding `<script>` shows as text.
Plots use matplotlib, imported only when a plot is asked for (the `plots` extra).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from .explain import CandidateExplanation, Concept, DeletionReport, Explanation, Word

_POS, _NEG = (22, 163, 74), (220, 38, 38)

_CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1f2933;font-size:15px;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:24px 28px 40px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:0 0 12px;color:#334e68}
.sub{color:#627d98;font-size:13px}
.card{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(15,23,42,.08);padding:18px 20px;margin:16px 0}
.query{font-size:19px;margin:10px 0 6px;line-height:1.9}
.w{border-radius:4px;padding:1px 2px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th{text-align:left;color:#627d98;font-weight:600;border-bottom:2px solid #e4e7eb;padding:6px 8px;white-space:nowrap}
td{border-bottom:1px solid #eef0f3;padding:6px 8px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.promoted td{background:#f0fdf4}
.up{color:#15803d;font-weight:700}.down{color:#b91c1c;font-weight:700}.same{color:#9aa5b1}
.out{color:#9aa5b1;font-style:italic}
.title{max-width:320px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.bars .row{display:grid;grid-template-columns:130px 1fr 58px;align-items:center;gap:8px;margin:3px 0;font-size:13.5px}
.bars .label{text-align:right;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bars .track{background:#f1f3f5;border-radius:4px;height:14px}
.bars .fill{height:14px;border-radius:4px}
.bars .val{font-variant-numeric:tabular-nums;color:#52606d;font-size:12.5px}
.parts{display:flex;gap:14px;flex-wrap:wrap;font-size:13px;color:#52606d;margin:4px 0 8px}
.parts b{color:#1f2933}
.doc{max-height:13.5em;overflow:hidden;font-size:14px;line-height:1.7;border-left:3px solid #e4e7eb;padding-left:12px;margin-top:8px}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
.chip{border-radius:12px;padding:1px 9px;font-size:12.5px}
.legend{font-size:12.5px;color:#627d98;margin-top:6px}
.muted{color:#9aa5b1}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _shade(weight: float, scale: float) -> str:
    """Background for a signed weight: green (helps) / red (hurts), opacity by magnitude."""
    if scale <= 0 or weight == 0:
        return "transparent"
    r, g, b = _POS if weight > 0 else _NEG
    alpha = 0.12 + 0.6 * min(abs(weight) / scale, 1.0)
    return f"rgba({r},{g},{b},{alpha:.2f})"


def highlight(text: str, words: Sequence[Word] | None, limit: int | None = None) -> str:
    """`text` as escaped HTML with each attributed word shaded by its weight (tooltip: the weight)."""
    if not words:
        return _esc(text[:limit] + ("…" if limit and len(text) > limit else "")) if limit else _esc(text)
    scale = max((abs(w.weight) for w in words), default=0.0)
    out, last = [], 0
    for word in words:
        if limit is not None and word.start >= limit:
            break
        out.append(_esc(text[last : word.start]))
        out.append(f'<span class="w" style="background:{_shade(word.weight, scale)}" title="{word.weight:+.4f}">'
                   f"{_esc(text[word.start : word.end])}</span>")
        last = word.end
    end = len(text) if limit is None else min(len(text), max(limit, last))
    out.append(_esc(text[last:end]))
    if end < len(text):
        out.append("…")
    return "".join(out)


def _bars(concepts: Sequence[Concept], title: str, scale: float) -> str:
    if not concepts:
        return f'<div class="bars"><div class="sub">{_esc(title)}</div><div class="muted">none (no modulation)</div></div>'
    rows = []
    for c in concepts:
        r, g, b = _POS if c.weight > 0 else _NEG
        width = 100.0 * min(abs(c.weight) / scale, 1.0) if scale > 0 else 0.0
        rows.append(f'<div class="row"><div class="label" title="{_esc(c.token)}">{_esc(c.token)}</div>'
                    f'<div class="track"><div class="fill" style="width:{width:.1f}%;background:rgb({r},{g},{b})"></div></div>'
                    f'<div class="val">{c.weight:+.3f}</div></div>')
    return f'<div class="bars"><div class="sub">{_esc(title)}</div>{"".join(rows)}</div>'


def _arrow(shift: int) -> str:
    if shift > 0:
        return f'<span class="up">▲ {shift}</span>'
    if shift < 0:
        return f'<span class="down">▼ {-shift}</span>'
    return '<span class="same">= 0</span>'


def _title(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _ranking_table(exp: Explanation, top: int) -> str:
    head = ("<tr><th>after</th><th>move</th><th>before</th><th>document</th><th>text</th><th>base</th><th>adapted</th>"
            "<th>projection</th><th>modulation A<sub>q</sub></th><th>refinement A<sub>d</sub></th></tr>")
    rows = []
    for c in exp.candidates:
        cls = ' class="promoted"' if c.doc_id == exp.promoted else ""
        after = str(c.adapted_rank) if c.adapted_rank <= top else f'<span class="out">{c.adapted_rank}</span>'
        before = str(c.base_rank) if c.base_rank <= top else f'<span class="out">{c.base_rank}</span>'
        rows.append(
            f"<tr{cls}><td class=num>{after}</td><td>{_arrow(c.rank_shift)}</td><td class=num>{before}</td>"
            f"<td>{_esc(c.doc_id)}</td><td><div class=title title=\"{_esc(_title(c.text, 300))}\">{_esc(_title(c.text))}</div></td>"
            f"<td class=num>{c.base_score:.3f}</td><td class=num>{c.adapted_score:.3f}</td>"
            f"<td class=num>{c.projection:+.3f}</td><td class=num>{c.modulation:+.3f}</td><td class=num>{c.refinement:+.3f}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _doc_card(exp: Explanation, cand: CandidateExplanation) -> str:
    scale = max([abs(c.weight) for c in cand.toward + cand.away] or [0.0])
    q_words = tuple(Word(w.text, w.start, w.end, weight) for w, weight in zip(exp.query_words, cand.query_weights))
    label = "most promoted" if cand.doc_id == exp.promoted else f"rank {cand.adapted_rank}"
    return (
        f'<div class="card"><h2>{_esc(cand.doc_id)} <span class="sub">— {_esc(label)}: {cand.base_rank} → '
        f"{cand.adapted_rank} {_arrow(cand.rank_shift)}</span></h2>"
        f'<div class="parts"><span>base <b>{cand.base_score:.3f}</b></span><span>+ projection <b>{cand.projection:+.3f}</b></span>'
        f"<span>+ modulation <b>{cand.modulation:+.3f}</b></span><span>+ refinement <b>{cand.refinement:+.3f}</b></span>"
        f"<span>= adapted <b>{cand.adapted_score:.3f}</b></span></div>"
        f'<div class="sub">Query words that drove this document\'s adapted score (occlusion):</div>'
        f'<div class="query" style="font-size:16px;margin:2px 0 6px">{highlight(exp.query, q_words)}</div>'
        f'<div class="grid">{_bars(cand.toward[:8], "modulation moved it toward (vs. other candidates)", scale)}'
        f'{_bars(cand.away[:8], "… and away from", scale)}</div>'
        f'<div class="sub" style="margin-top:10px">Document words that drove its adapted score '
        f'{"(gradient × input)" if cand.doc_words else "(not attributed: raise --doc-words)"}:</div>'
        f'<div class="doc">{highlight(cand.text, cand.doc_words, 1400)}</div></div>'
    )


def render_html(exp: Explanation, top: int = 10, doc_cards: int = 3) -> str:
    """The whole report as one HTML string (inline CSS, no scripts, all text escaped)."""
    promoted = exp.candidate(exp.promoted) if exp.promoted else None
    q_scale = max([abs(c.weight) for c in exp.pulled_toward + exp.pushed_from] or [0.0])
    moved_up = sum(1 for c in exp.candidates if c.adapted_rank <= top and c.base_rank > top)
    summary = (f"{exp.num_candidates} candidates re-ranked · concept vocabulary: {exp.vocabulary} · "
               f"{moved_up} document(s) entered the top {top}")
    if exp.gate < 1.0:
        summary += f" · novelty gate {exp.gate:.2f} (share of the adapted score in the final one)"
    if promoted is not None:
        summary += f" · most promoted: {promoted.doc_id} ({promoted.base_rank} → {promoted.adapted_rank})"
    cards = sorted((c for c in exp.candidates if c.doc_words), key=lambda c: (c.doc_id != exp.promoted, c.adapted_rank))
    cards += [c for c in exp.candidates if not c.doc_words and c.adapted_rank <= top][: max(0, doc_cards - len(cards))]
    title = f"imrnn explanation — {exp.query_id or 'query'}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body><main>'
        f'<h1>Why the adapters re-ranked this query</h1><div class="sub">{_esc(title)} · {_esc(summary)}</div>'
        f'<div class="card"><h2>Query</h2><div class="query">{highlight(exp.query, exp.query_words)}</div>'
        f'<div class="legend">Shading: how much the adapted score of the most-promoted document drops when the word is removed '
        f'(<span style="color:rgb{_POS}">green</span> supports it, <span style="color:rgb{_NEG}">red</span> works against it).</div></div>'
        f'<div class="card"><h2>Ranking before → after</h2>{_ranking_table(exp, top)}'
        f'<div class="legend">before = frozen retriever (cosine), after = IMRNN adapters. adapted = base + projection + '
        f"modulation + refinement, split exactly (Shapley over the two adapters). Grey ranks lie outside the top {top}.</div></div>"
        f'<div class="card"><h2>Concepts: where the document adapter (feedback) moved the query</h2><div class="grid">'
        f'{_bars(exp.pulled_toward[:10], "pulled toward", q_scale)}{_bars(exp.pushed_from[:10], "pushed from", q_scale)}</div>'
        f'<div class="legend">Back-projection of q̂ − q̃ (both unit vectors) through the pseudo-inverse of the projection, '
        f"matched against the concept vocabulary. On trained checkpoints much of this move is shared by all queries (a learned "
        f"prior); the document cards show each document's move relative to the other candidates.</div></div>"
        + "".join(_doc_card(exp, c) for c in cards)
        + "</main></body></html>"
    )


def write_html(exp: Explanation, path: str | Path, top: int = 10) -> Path:
    """Write the report to `path` (UTF-8) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(exp, top), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("Plots need matplotlib: pip install 'imrnn[plots]' (or pip install matplotlib).") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rank_shift_chart(exp: Explanation, path: str | Path, top: int = 10) -> Path:
    """Slope chart: each shown document's base rank (left) joined to its adapted rank (right)."""
    plt = _pyplot()
    cands = list(exp.candidates)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(cands) + 1.6), dpi=130)
    for c in cands:
        color = "#16a34a" if c.rank_shift > 0 else "#dc2626" if c.rank_shift < 0 else "#9aa5b1"
        width = 2.6 if c.doc_id == exp.promoted else 1.4
        ax.plot([0, 1], [c.base_rank, c.adapted_rank], color=color, lw=width, marker="o", ms=4)
        ax.text(-0.03, c.base_rank, f"{c.doc_id}  {c.base_rank}", ha="right", va="center", fontsize=8)
        ax.text(1.03, c.adapted_rank, f"{c.adapted_rank}  {c.doc_id} ({c.rank_shift:+d})", ha="left", va="center", fontsize=8)
    ax.set_yscale("symlog", linthresh=top)
    ax.invert_yaxis()
    ax.set_xlim(-0.6, 1.6)
    ax.set_xticks([0, 1], ["frozen retriever", "IMRNN adapters"])
    ax.set_yticks([])
    ax.tick_params(axis="y", which="both", left=False, labelleft=False)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"Rank shifts — {exp.query_id or ''} {exp.query[:70]}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def concept_chart(exp: Explanation, path: str | Path, k: int = 10) -> Path:
    """Signed bars: concepts the query was pulled toward / pushed from, and the promoted document's."""
    plt = _pyplot()
    panels = [("query (its move q̂ − q̃)", exp.pulled_toward[:k], exp.pushed_from[:k])]
    if exp.promoted:
        cand = exp.candidate(exp.promoted)
        panels.append((f"document {cand.doc_id} (relative move)", cand.toward[:k], cand.away[:k]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 0.32 * 2 * k + 1.4), dpi=130, squeeze=False)
    for ax, (name, toward, away) in zip(axes[0], panels):
        items = list(toward) + list(reversed(away))
        if not items:
            ax.text(0.5, 0.5, "no modulation", ha="center", va="center")
            ax.set_axis_off()
            continue
        labels = [c.token for c in items][::-1]
        values = [c.weight for c in items][::-1]
        ax.barh(range(len(items)), values, color=["#16a34a" if v > 0 else "#dc2626" for v in values])
        ax.set_yticks(range(len(items)), labels, fontsize=8)
        ax.axvline(0, color="#52606d", lw=0.8)
        ax.set_title(f"Concepts — {name}", fontsize=10)
        ax.set_xlabel("weight (back-projected move along the concept)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_plots(exp: Explanation, directory: str | Path, top: int = 10) -> list[Path]:
    """Write `rank_shift.png` and `concepts.png` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [rank_shift_chart(exp, directory / "rank_shift.png", top), concept_chart(exp, directory / "concepts.png")]


# --------------------------------------------------------------------------- faithfulness summary


def deletion_markdown(report: DeletionReport, title: str = "") -> str:
    """The deletion test as a markdown table: share of pairs where attributed deletion beats random, mean drops."""
    s = report.summary()
    lines = [f"{title}\n" if title else "",
             f"Deletion test: n = {report.n} query words deleted, random baseline = mean of {report.draws} draws, "
             f"{s.get('pairs', 0)} (query, most-promoted document) pairs; skipped: "
             + (", ".join(f"{v} {k}" for k, v in sorted(report.skipped.items())) or "none") + ".",
             "",
             "| method | attributed beats random | mean drop (attributed) | mean drop (random) |",
             "|---|---:|---:|---:|"]
    if s.get("pairs"):
        lines.append(f"| token attribution (occlusion) | {s['token_share']:.1%} | {s['token_drop']:.4f} | {s['random_drop']:.4f} |")
        lines.append(f"| concepts ({report.vocabulary} vocabulary, {report.concept_source}) | {s['concept_share']:.1%} | "
                     f"{s['concept_drop']:.4f} | {s['random_drop']:.4f} |")
    return "\n".join(line for line in lines if line is not None)
