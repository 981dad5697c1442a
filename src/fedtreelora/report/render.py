"""Assemble a run's figures and tables into ``report.html`` (self-contained) and ``report.md``."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtreelora.report import plots
from fedtreelora.report.data import RunData, load_run
from fedtreelora.runfolder import Headline, PrivacyRecord, RunFolder

#: folder next to report.md that holds its PNG figures
FIGURES_DIR = RunFolder.FIGURES_DIR
FIGURE_NAMES = ("tree", "sharing", "accuracy", "lambda", "labels", "communication")
#: figures only a run with planted groups (``data.groups``) has
STRUCTURE_FIGURE_NAMES = ("ari",)
#: figures only a run with ``privacy`` on has
PRIVACY_FIGURE_NAMES = ("privacy",)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child, table.facts td { text-align: left; }
figure { margin: 0.6em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; } .note { font-style: italic; }
"""


@dataclass
class Section:
    """One figure of the report.

    Attributes:
        key: file stem of its PNG (``report_files/{key}.png``).
        title: section heading.
        caption: what the figure shows.
        png: the rendered figure, or None when the run has nothing to show here.
        note: said instead of the figure when ``png`` is None.
        rows: (name, value) facts shown above the figure (or the note), when the section has them.
    """

    key: str
    title: str
    caption: str
    png: bytes | None = None
    note: str = ""
    rows: list[tuple[str, str]] | None = None


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def build_sections(run: RunData) -> list[Section]:
    """Render every figure of the report (PNG bytes)."""
    method = run.method
    sections: list[Section] = []
    tree = plots.plot_tree(run)
    tree_section = Section(
        "tree",
        "Client tree and layer cuts",
        "Agglomerative tree of the clients built once after warm-up from the distances of their LoRA B "
        "matrices. Each dashed line cuts the tree into exactly as many clusters as the labelled layers "
        "share among: shallow layers cut high (a shared trunk), deep layers lower (branches).",
    )
    if len(run.summary.get("plans") or []) > 1:
        tree_section.caption += (
            " This run re-planned (replan_every): the tree shown is the last one built (with replan_from "
            "updates, the one built after warm-up: re-plans move clients between its branches, so a moved "
            "client's leaf is where it started); the Federation changes table lists every plan's cuts and "
            "clusters."
        )
    if tree is not None:
        tree_section.png = plots.figure_png(tree[0])
    elif run.plan is None and method == "fedtreelora":
        tree_section.note = "This run has no client tree: it ended before the tree is built (during warm-up)."
    else:
        tree_section.note = f"The {method} method builds no client tree, so there is no dendrogram."
    sections.append(tree_section)

    sharing = plots.plot_sharing_map(run)
    sections.append(
        Section(
            "sharing",
            "Who shares with whom, per layer",
            "Each cell is a client's cluster at a layer; clients with the same number in a row share one "
            "expert at that layer. One colour per row means full sharing (FedIT-like), all different "
            "means no sharing (local training).",
            png=None if sharing is None else plots.figure_png(sharing),
            note=f"The {method} run recorded no per-layer clusters.",
        )
    )
    if run.planted_groups is not None:
        sections.append(_ari_section(run))
    sections.append(
        Section(
            "accuracy",
            f"{run.metric.capitalize() if run.metric == 'accuracy' else 'ROUGE-1'} over rounds",
            f"Each client's {run.metric} on its own validation split (drawn with its own label skew or task) after every "
            "round, and the mean over clients; grey bands mark warm-up rounds (local training only). The circle "
            "marks the best round, the square the best round after warm-up where it is another one.",
            png=plots.figure_png(plots.plot_accuracy(run)),
        )
    )
    lambdas = plots.plot_lambdas(run)
    mixer = ((run.meta or {}).get("final_phase") or {}).get("mixer", "unknown")
    sections.append(
        Section(
            "lambda",
            "Lambda per layer",
            "lambda = sigmoid(mix logit) weighs the cluster expert, 1 - lambda the external expert (the mean "
            "of all other clients). At layers where everyone is in one cluster the external expert is zero.",
            png=None if lambdas is None else plots.figure_png(lambdas),
            note=f"The {method} run does not mix experts with a learned lambda (final mixer: {mixer}).",
        )
    )
    counts = plots.plot_label_counts(run)
    sections.append(
        Section(
            "labels",
            "Label counts per client",
            "How many training examples of each label (generation: of each task) every client holds.",
            png=None if counts is None else plots.figure_png(counts),
            note="The run folder holds no partition record.",
        )
    )
    sections.append(
        Section(
            "communication",
            "Communication per round",
            "Megabytes of adapter tensors (float32) each client sends up and receives down per round, "
            "averaged over the clients that took part.",
            png=plots.figure_png(plots.plot_communication(run)),
        )
    )
    if run.summary.privacy is not None:
        sections.append(_privacy_section(run, run.summary.privacy))
    return sections


def _epsilon_text(value: float | None) -> str:
    return "unbounded (no noise: no guarantee)" if value is None else f"{value:.2f}"


def privacy_rows(privacy: PrivacyRecord) -> list[tuple[str, str]]:
    """(name, value) facts of a run's client-level differential privacy (docs/privacy.md)."""
    z, target = privacy.noise_multiplier, privacy.target_epsilon
    if z == 0:
        mechanism = "clipping only (noise multiplier 0): each client's update clipped, no noise, no guarantee"
    else:
        mechanism = (
            "Gaussian, client-level: each client's update clipped to L2 norm S, then N(0, (z S)^2) noise "
            "added to every coordinate before it leaves the client"
        )
    noise = "-" if z is None else f"{z:.4g}"
    if target is not None:
        noise += f" (derived for target epsilon {target:g} after {_fmt(privacy.planned_rounds)} rounds)"
    adjacency = {
        "add_remove": "add_remove (a client's whole data present or absent: sensitivity S)",
        "replace": "replace (a client's whole data swapped for other data: sensitivity 2S)",
    }.get(privacy.adjacency or "", _fmt(privacy.adjacency))
    q = "-" if privacy.sample_rate is None else f"{privacy.sample_rate:g}"
    server = _epsilon_text(privacy.epsilon_server)
    per_client = [v for v in privacy.per_client_epsilon_server if v is not None]
    if privacy.epsilon_server is not None:
        server += " (largest over clients, every round a client uploaded in counted in full"
        if per_client and min(per_client) != max(per_client):
            server += f"; per client {min(per_client):.2f}-{max(per_client):.2f}"
        server += ")"
    epsilon = _epsilon_text(privacy.epsilon)
    if privacy.epsilon is not None:
        epsilon += f" (amplified by sampling at q = {q}: for those who receive aggregates and the models)"
    return [
        ("mechanism", mechanism),
        ("clip norm S", "-" if privacy.clip_norm is None else f"{privacy.clip_norm:g}"),
        ("noise multiplier z", noise),
        ("delta", "-" if privacy.delta is None else f"{privacy.delta:g}"),
        ("adjacency", adjacency),
        (
            "accountant",
            f"{_fmt(privacy.accountant)} (Opacus), sampling rate q = {q}, "
            f"{_fmt(privacy.upload_rounds)} rounds with uploads",
        ),
        ("final epsilon against the other clients", epsilon),
        ("final epsilon against the server", server),
    ]


def _privacy_section(run: RunData, privacy: PrivacyRecord) -> Section:
    """Client-level differential privacy (runs with ``privacy`` on): the settings, the final epsilons and
    epsilon after each round."""
    figure = plots.plot_privacy(run)
    delta = "-" if privacy.delta is None else f"{privacy.delta:g}"
    return Section(
        "privacy",
        "Privacy",
        f"Epsilon at delta {delta} after each round: against the other clients, who receive only aggregates "
        "of noisy uploads and do not know who was sampled (amplified by sampling), and against the server, "
        "which samples the clients and sees each noisy upload (each client's own upload rounds, the largest "
        "over clients shown). The unit of privacy is a client's whole data; see docs/privacy.md.",
        png=None if figure is None else plots.figure_png(figure),
        note="Every epsilon is unbounded: with noise multiplier 0, clipping alone gives no guarantee.",
        rows=privacy_rows(privacy),
    )


def _ari_section(run: RunData) -> Section:
    """The planted groups against each layer's sharing partition (runs with ``data.groups``)."""
    ari = plots.plot_ari(run)
    return Section(
        "ari",
        "Sharing partitions against the planted groups",
        "The adjusted Rand index (ARI) between the clusters each layer shares among and the planted groups "
        "at each depth of their hierarchy (depth 1 groups clients by the first part of their group's name, "
        "depth 2 by the first two, ...). 1 means the layer's clusters are exactly the planted groups at that "
        "depth; 0 is what chance scores, and also what one cluster for everyone or every client alone "
        "scores against several groups; below 0 is worse than chance. A method that finds a hierarchy "
        "scores high at depth 1 in shallow layers and at deeper depths in deeper layers. Where a group's "
        "labels drift during the run (data.groups[].drift), the groups are those of the last round.",
        png=None if ari is None else plots.figure_png(ari),
        note=f"The {run.method} run recorded no per-layer sharing partition, so it cannot be scored against "
        "the planted groups.",
    )


def overview_rows(run: RunData) -> list[tuple[str, str]]:
    """(name, value) facts of the run for the top table."""
    s, cfg = run.summary, run.config
    model = cfg.get("model") or (run.meta or {}).get("model") or {}
    rows = [
        ("method", run.method),
        ("dataset", _fmt(s.dataset)),
        ("clients", _fmt(run.num_clients)),
        ("rounds", f"{run.num_rounds} ({len(run.warmup_rounds)} warm-up)"),
        (f"final mean {run.metric}", _fmt(s.final_mean)),
        (f"best mean {run.metric}", f"{_fmt(s.best_mean)} (round {(s.best_round or 0) + 1})"),
        (f"best federated mean {run.metric}", best_federated_text(s.headline)),
        ("clusters per layer (cuts)", _fmt(s.cuts)),
        ("backbone", f"{model.get('name', '?')}, {model.get('num_layers') or 'all'} layers"),
        (
            "LoRA",
            f"rank {model.get('rank', '?')}, alpha {model.get('alpha', '?')} on {model.get('target_modules', '?')}",
        ),
    ]
    if s.trainable_params_per_client is not None:
        rows.append(
            (
                "trainable parameters per client",
                f"{s.trainable_params_per_client:,} ({_fmt(s.trainable_percent, 3)}% of the backbone)",
            )
        )
    plan = run.plan
    if plan is not None:
        tau = plan.get("tau")
        auto = plan.get("auto") or {}
        if tau == "auto" and auto:
            tau = f"auto (level {auto.get('level')}, {auto.get('permutations')} relabellings, seed {auto.get('seed')})"
        rows.append(("tau, window", f"{tau}, {plan.get('window')}"))
    rows += finding_rows(run)
    if run.planted_groups is not None and run.planted_levels is not None:
        per_depth = ", ".join(str(len(set(level))) for level in run.planted_levels)
        rows.append(("planted groups", f"{len(set(run.planted_groups))} (per depth: {per_depth})"))
    history = s.history
    up = sum(h.uplink_mb for h in history)
    down = sum(h.downlink_mb for h in history)
    rows.append(("communication per client", f"up {up:.3f} MB, down {down:.3f} MB"))
    if s.wall_seconds is not None:
        rows.append(("wall time", f"{s.wall_seconds:.1f} s"))
    return rows


def best_federated_text(headline: Headline) -> str:
    """The best federated round's overview cell: its mean and round (the best round after warm-up,
    which the best round may precede), or why there is none."""
    best, rnd = headline.best_federated_mean, headline.best_federated_round
    if best is None or rnd is None:
        return "- (no round after warm-up, or a history without phases)"
    return f"{_fmt(best)} (round {rnd + 1}; the best round after warm-up)"


def finding_rows(run: RunData) -> list[tuple[str, str]]:
    """The line the run printed where it made its clusters (recomputed for runs written before it was
    recorded), and how closely the deepest layer's clusters follow the clients' majority class: a finding
    when they do, else the number; nothing for a run without clusters."""
    s = run.summary
    personal = bool((run.config.get("fedtreelora") or {}).get("personal", False))
    finding = s.finding or s.clustering_finding(personal)
    rows = [] if finding is None else [("what the clustering found", str(finding))]
    prior = s.label_prior()
    labels = run.labels
    if prior is not None and labels is not None:
        placed = labels[-1][labels[-1] >= 0]
        # One cluster, or every client alone, says nothing about a label prior: no row.
        if 1 < len(set(placed.tolist())) < placed.size:
            rows.append(("clusters against the majority class", prior.text))
    return rows


CUT_SEARCH_NOTE = (
    "Every candidate cluster count each layer looked at, shallow to deep. silhouette: the mean silhouette "
    "of the tree's cut into that many clusters, under the layer's own distances; the layer keeps the "
    "allowed candidate with the best one (ties to fewer clusters). With a numeric tau, one cluster scores "
    "tau and every candidate is allowed."
)
CUT_SEARCH_AUTO_NOTE = (
    " With tau = auto, one cluster has no score and a count above the previous layer's is allowed only when "
    "admissible: its tested silhouette (the same count's cut of a tree built without this layer) beats its "
    "null quantile (the silhouettes of random relabellings of the clients, within the previous layer's "
    "clusters) at this layer (passes) and at every deeper layer. A layer with nothing admissible keeps "
    "the previous layer's count."
)


def cut_search_rows(run: RunData) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the cut-search table (one row per layer and candidate), or None when the run
    recorded no candidate scores (methods without a plan, ``cut_mode: fixed``)."""
    plan = run.plan
    if plan is None or not plan.get("scores"):
        return None
    auto = plan.get("tau") == "auto"
    cuts = plan.get("cuts") or []
    header = ["layer", "clusters kept", "candidate", "silhouette"]
    if auto:
        header += ["tested silhouette", "null quantile", "passes here", "admissible"]
    rows = []

    def per_layer(key: str, layer: int) -> dict[str, Any]:
        values = plan.get(key) or []
        return values[layer] if layer < len(values) else {}

    for layer, scores in enumerate(plan["scores"]):
        kept = cuts[layer] if layer < len(cuts) else None
        tested, quantiles = per_layer("test_scores", layer), per_layer("null_quantiles", layer)
        admissible = {str(c) for c in per_layer("admissible", layer)}
        for c, score in sorted(scores.items(), key=lambda item: int(item[0])):
            chosen = kept is not None and int(c) == int(kept)
            score_text = f"tau {_fmt(float(score), 3)}" if int(c) == 1 else _fmt(float(score), 3)
            row = [str(layer), _fmt(kept), f"{c} (kept)" if chosen else str(c), score_text]
            if auto:
                if str(c) in quantiles:
                    passes = float(tested[str(c)]) > float(quantiles[str(c)])
                    row += [
                        _fmt(float(tested[str(c)]), 3),
                        _fmt(float(quantiles[str(c)]), 3),
                        "yes" if passes else "no",
                        "yes" if str(c) in admissible else "no",
                    ]
                else:
                    row += ["-", "-", "-", "always (previous count)"]
            rows.append(row)
    return header, rows


CHANGES_NOTE = (
    "Who joined and left (federation.join / leave; rounds count from 1), where each client that arrived "
    "after the tree was built was placed (its cluster at every layer, shallow to deep, after its own "
    "warm-up), with replan_every every plan the run made, and the planted groups whose labels drifted "
    "(data.groups[].drift: from that round on their clients train and are scored on the new labels)."
)


def deepest(plan: Mapping[str, Any]) -> str:
    """A plan's clusters at the deepest layer as ``deepest layer {0, 1} {2, 3, 4}`` (placed clients)."""
    labels = (plan.get("labels") or [[]])[-1]
    clusters: dict[int, list[int]] = {}
    for client, label in enumerate(labels):
        if int(label) >= 0:
            clusters.setdefault(int(label), []).append(client)
    return "deepest layer " + " ".join("{" + ", ".join(map(str, c)) + "}" for c in clusters.values())


def federation_change_rows(run: RunData) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the federation's changes: joins and leaves by round, each late client's
    placement, and every plan after the first; None when the federation did not change."""
    s = run.summary
    rows: list[list[str]] = []
    for record in s.get("history") or []:
        rnd = int(record.get("round", 0)) + 1
        for key, what in (("joined", "joined"), ("left", "left")):
            for k in record.get(key) or []:
                rows.append([str(rnd), what, str(k), ""])
    planted = run.planted_groups
    for placement in s.get("placements") or []:
        client = int(placement["client"])
        clusters = " ".join(str(int(v)) for v in placement.get("labels") or [])
        if planted is not None and client < len(planted):  # a planted federation: say where it belongs
            clusters += f" (planted group {planted[client]})"
        rows.append([str(int(placement["round"]) + 1), "placed (after the round)", str(client), clusters])
    rows += drift_rows(run.config)
    plans = s.get("plans") or []
    for plan in plans[1:]:
        cuts = " ".join(str(int(c)) for c in plan.get("cuts") or [])
        rows.append(
            [str(int(plan["round"]) + 1), "re-planned (after the round)", "all", f"cuts {cuts}; {deepest(plan)}"]
        )
    if not rows:
        return None
    rows.sort(key=lambda r: int(r[0]))
    return ["round", "event", "client", "clusters per layer / cuts"], rows


def drift_rows(config: dict[str, Any]) -> list[list[str]]:
    """One federation-change row per planted group whose labels drift (``data.groups[i].drift`` of a
    run's ``config``): its round (1-based), its clients, its name before and after and its new labels."""
    rows: list[list[str]] = []
    first = 0
    for group in (config.get("data") or {}).get("groups") or []:
        clients = int(group["clients"])
        drift = group.get("drift")
        if drift:
            name = drift.get("name") or group["name"]
            labels = ", ".join(f"{k} -> {v}" for k, v in (drift.get("label_map") or {}).items())
            rows.append(
                [
                    str(int(drift["round"])),
                    "labels drifted",
                    f"{first}-{first + clients - 1}" if clients > 1 else str(first),
                    f"group {group['name']} -> {name} ({labels})",
                ]
            )
        first += clients
    return rows


def client_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-client table."""
    s = run.summary
    final = s.per_client_at("final_mean")
    best = s.per_client_at("best_mean")
    labels = run.labels
    found = run.label_counts()
    lambdas = run.lambdas()
    header = ["client", f"final {run.metric}", f"{run.metric} at best round", "train examples", "cluster per layer"]
    if lambdas is not None:
        header.append("mean lambda")
    rows = []
    for k in range(run.num_clients):
        row = [
            str(k),
            _fmt(final[k] if k < len(final) else None),
            _fmt(best[k] if k < len(best) else None),
            _fmt(int(found[0][k].sum()) if found is not None and k < found[0].shape[0] else None),
            "-" if labels is None else " ".join(str(int(v)) if v >= 0 else "-" for v in labels[:, k]),
        ]
        if lambdas is not None:
            row.append(_fmt(_nanmean(lambdas.values[k]), 3) if k < lambdas.values.shape[0] else "-")
        rows.append(row)
    return header, rows


def _html_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    esc = html.escape
    head = "" if header is None else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{css_class}"' if css_class else ""
    return f"<table{attr}>{head}{body}</table>"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_html(run: RunData, sections: Sequence[Section]) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG data URIs, no external references."""
    esc = html.escape
    title = f"fedtreelora report: {run.method} on {run.summary.dataset or '?'}"
    header, rows = client_rows(run)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="note">Run folder: {esc(str(run.run_dir))}</p>',
        _html_table(None, overview_rows(run), "facts"),
    ]
    for section in sections:
        parts.append(f'<h2 id="{esc(section.key)}">{esc(section.title)}</h2>')
        if section.rows is not None:
            parts.append(_html_table(None, section.rows, "facts"))
        if section.png is None:
            parts.append(f'<p class="note">{esc(section.note)}</p>')
            continue
        data = base64.b64encode(section.png).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(section.title)}">'
            f"<figcaption>{esc(section.caption)}</figcaption></figure>"
        )
    search = cut_search_rows(run)
    if search is not None:
        note = CUT_SEARCH_NOTE + (CUT_SEARCH_AUTO_NOTE if run.plan and run.plan.get("tau") == "auto" else "")
        parts += [
            '<h2 id="cut-search">Cut search per layer</h2>',
            f'<p class="note">{esc(note)}</p>',
            _html_table(*search),
        ]
    changes = federation_change_rows(run)
    if changes is not None:
        parts += [
            '<h2 id="changes">Federation changes</h2>',
            f'<p class="note">{esc(CHANGES_NOTE)}</p>',
            _html_table(*changes),
        ]
    parts += ["<h2>Clients</h2>", _html_table(header, rows), "</body></html>"]
    return "\n".join(parts) + "\n"


def render_markdown(run: RunData, sections: Sequence[Section]) -> str:
    """Markdown with the figures as ``report_files/<key>.png`` next to the file."""
    title = f"fedtreelora report: {run.method} on {run.summary.dataset or '?'}"
    lines = [f"# {title}", "", _md_table(["", ""], overview_rows(run)), ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.rows is not None:
            lines += [_md_table(["", ""], section.rows), ""]
        if section.png is None:
            lines += [f"*{section.note}*", ""]
            continue
        lines += [f"![{section.title}]({FIGURES_DIR}/{section.key}.png)", "", section.caption, ""]
    search = cut_search_rows(run)
    if search is not None:
        note = CUT_SEARCH_NOTE + (CUT_SEARCH_AUTO_NOTE if run.plan and run.plan.get("tau") == "auto" else "")
        lines += ["## Cut search per layer", "", note, "", _md_table(*search), ""]
    changes = federation_change_rows(run)
    if changes is not None:
        lines += ["## Federation changes", "", CHANGES_NOTE, "", _md_table(*changes), ""]
    header, rows = client_rows(run)
    lines += ["## Clients", "", _md_table(header, rows), ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and ``report_files/*.png`` into a finished run folder.

    Reads only the run folder (summary, metrics, partition, config and the clients' saved adapters).

    Args:
        run_dir: the run's output folder.
    Returns:
        (path of report.html, path of report.md).
    """
    run = load_run(run_dir)
    sections = build_sections(run)
    folder = run.folder.report_figures
    folder.mkdir(exist_ok=True)
    # Drop figures of an earlier report that this one no longer has.
    for name in (*FIGURE_NAMES, *STRUCTURE_FIGURE_NAMES, *PRIVACY_FIGURE_NAMES):
        (folder / f"{name}.png").unlink(missing_ok=True)
    for section in sections:
        if section.png is not None:
            (folder / f"{section.key}.png").write_bytes(section.png)
    html_path, md_path = run.folder.report_html, run.folder.report_md
    html_path.write_text(render_html(run, sections), encoding="utf-8")
    md_path.write_text(render_markdown(run, sections), encoding="utf-8")
    return html_path, md_path
