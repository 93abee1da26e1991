"""``tinyfleet report RUN_DIR``: a run's ``metrics.json`` (simulate or serve) -> ``index.html`` + PNG plots beside it.

The page is self-contained and static: plots are PNG files next to it (relative paths), tables are plain HTML,
styling is inline CSS, and there is no JavaScript, so it reads the same in a browser, a file viewer or a CI
artifact. Plots: accuracy per round (global, personalized, local-only, centralized), per-device accuracy
distribution, bytes up/down per device per round, participation and dropout per round, per-device SRAM/flash
(and instructions per step) when known. This module reads metrics and draws; it never runs a simulation.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

METHODS = (  # metrics key suffix, label, colour
    ("global", "global model", "#1f77b4"),
    ("personalized", "global + personal tensors", "#2ca02c"),
    ("local", "local-only (no fleet)", "#ff7f0e"),
    ("centralized", "centralized fp32 (upper bound)", "#7f7f7f"),
)
PERSONAL_METHODS = (  # replayed personalization methods (fleet/sim/personalize.py), same layout
    ("ditto", "Ditto personal model", "#9467bd"),
    ("finetune", "fine-tuned personal model", "#8c564b"),
    ("head", "personal head", "#e377c2"),
    ("bias", "personal bias", "#17becf"),
)
PLOTS = {  # file -> caption
    "accuracy.png": "Accuracy per round on every device's held-out slice (pooled windows)",
    "device_accuracy.png": "Per-device accuracy at the end of the run, by method",
    "bytes.png": "MQTT bytes per selected device per round",
    "participation.png": "Participation and dropout per round",
    "memory.png": "Per-device memory: planned by the compiler (host devices) or measured (boards)",
    "behaviour.png": "Who was awake when (simulated clock, behaviour model): bars awake, | task received, "
                     "dot delta sent, x task lost mid-way",
}
PERSONAL_PLOTS = {  # drawn when the run measured personalization methods / continual evaluation
    "personal.png": "Per-device accuracy of each model (global, local-only, each personalization method)",
    "prequential.png": "Prequential (test-then-train) accuracy per round over each device's stream, pooled; "
                       "one panel per buffer policy, and the drift case (dotted line: the stream switches user)",
}


class ReportError(ValueError):
    """The run directory has no usable metrics.json; says what to run first."""


def load_metrics(run_dir: Path) -> dict:
    """``RUN_DIR/metrics.json`` as written by ``tinyfleet simulate --out RUN_DIR`` or ``serve --out RUN_DIR``
    (fleet/metrics.py, docs/metrics.md)."""
    from fleet.metrics import MetricsError, check_version

    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ReportError(f"{path} not found: run `tinyfleet simulate CONFIG --out {run_dir}` or `tinyfleet serve "
                          f"CONFIG --out {run_dir}` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "accuracy_per_round" not in data:
        raise ReportError(f"{path}: expected a run's metrics object with 'accuracy_per_round' (docs/metrics.md)")
    try:
        check_version(data, path)
    except MetricsError as e:
        raise ReportError(str(e)) from None
    return data


def round_series(m: dict) -> dict[str, list[float]]:
    """Method -> accuracy per round (index 0 = round 1); methods that were not measured are left out."""
    keys = {"global": "accuracy_per_round", "personalized": "accuracy_personalized_per_round",
            "local": "accuracy_local_per_round", "centralized": "accuracy_centralized_per_round"}
    return {name: list(m[k]) for name, k in keys.items() if m.get(k)}


def device_methods(rows: list[dict]) -> list[str]:
    """Methods with at least one per-device accuracy in the table, in METHODS then PERSONAL_METHODS order."""
    return [name for name, _, _ in (*METHODS, *PERSONAL_METHODS)
            if any(r.get(f"accuracy_{name}") is not None for r in rows)]


# --- plots ----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # NOTE: no display on servers and CI; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float = 7.0, height: float = 3.6):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy(m: dict, path: Path) -> None:
    plt, fig, ax = _figure()
    series = round_series(m)
    style = {name: (label, colour) for name, label, colour in (*METHODS, *PERSONAL_METHODS)}
    for name, accs in series.items():
        xs = list(range(1, len(accs) + 1))
        if name == "global" and "accuracy_initial" in m:  # round 0: the deployed model before any training
            xs, accs = [0, *xs], [m["accuracy_initial"], *accs]
        ls = "--" if name == "centralized" else "-"
        ax.plot(xs, accs, ls, marker="o", ms=3, label=style[name][0], color=style[name][1])
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right", fontsize=8)
    _save(plt, fig, path)


def plot_device_accuracy(rows: list[dict], path: Path) -> None:
    import numpy as np

    plt, fig, ax = _figure()
    names = device_methods(rows)
    style = {name: (label, colour) for name, label, colour in (*METHODS, *PERSONAL_METHODS)}
    rng = np.random.default_rng(0)  # jitter only
    for i, name in enumerate(names):
        vals = [r[f"accuracy_{name}"] for r in rows if r.get(f"accuracy_{name}") is not None]
        ax.boxplot([vals], positions=[i], widths=0.5, showfliers=False)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=12, alpha=0.7, color=style[name][1])
    ax.set_xticks(range(len(names)), [style[n][0].replace(" (", "\n(").replace(" + ", "\n+ ") for n in names],
                  fontsize=8)
    ax.set(ylabel="accuracy on the device's test slice", ylim=(0, 1.02), xlim=(-0.6, max(len(names), 1) - 0.4))
    _save(plt, fig, path)


def plot_device_bars(rows: list[dict], path: Path) -> None:
    """Grouped bars: one group per device, one bar per model."""
    import numpy as np

    names = device_methods(rows)
    style = {name: (label, colour) for name, label, colour in (*METHODS, *PERSONAL_METHODS)}
    plt, fig, ax = _figure(width=max(7.0, 0.35 * len(rows) * max(len(names), 1) / 3))
    x = np.arange(len(rows))
    w = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        ax.bar(x - 0.4 + w * (k + 0.5), [r.get(f"accuracy_{name}") or 0 for r in rows], w, label=style[name][0],
               color=style[name][1])
    ax.set_xticks(x, [r.get("device_id", str(i)) for i, r in enumerate(rows)], rotation=90, fontsize=6)
    ax.set(ylabel="accuracy on the device's test slice", ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    _save(plt, fig, path)


def plot_prequential(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.4), dpi=100, squeeze=False, sharey=True)
    style = {name: (label, colour) for name, label, colour in (*METHODS, *PERSONAL_METHODS)}
    for ax, run in zip(axes[0], runs):
        for name, curve in run["prequential"].items():
            xs = [i + 1 for i, a in enumerate(curve) if a is not None]
            ax.plot(xs, [a for a in curve if a is not None], marker="o", ms=3, color=style.get(name, ("", None))[1],
                    label=style.get(name, (name,))[0])
        title = f"{run['policy']} buffer ({run['capacity'] or 'all'})"
        if run.get("drift_round"):
            ax.axvline(run["drift_round"] - 0.5, color="#7f7f7f", ls=":")
            title += ", drift"
        ax.set(title=title, xlabel="round", ylim=(0, 1.02))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("prequential accuracy")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    _save(plt, fig, path)


def continual_rows(m: dict) -> list[list[object]]:
    """Per continual run and model: final prequential, mean prequential, forgetting, recovery rounds."""
    out = []
    for run in (m.get("continual") or {}).get("runs", []):
        case = f"{run['policy']}{' + drift' if run.get('drift_round') else ''}"
        for name, curve in run["prequential"].items():
            got = [a for a in curve if a is not None]
            out.append([case, name, got[-1] if got else None, sum(got) / len(got) if got else None,
                        (run.get("forgetting") or {}).get(name), (run.get("recovery_rounds") or {}).get(name)])
    return out


def plot_bytes(m: dict, path: Path) -> None:
    import numpy as np

    plt, fig, ax = _figure()
    up, down = m.get("bytes_up_per_device_round", []), m.get("bytes_down_per_device_round", [])
    x = np.arange(1, max(len(up), len(down)) + 1)
    ax.bar(x[:len(up)] - 0.2, up, 0.4, label="up (delta)", color="#d62728")
    ax.bar(x[:len(down)] + 0.2, down, 0.4, label="down (task + model update)", color="#1f77b4")
    if m.get("plan_bytes"):
        ax.axhline(m["plan_bytes"], color="#7f7f7f", ls=":", label=f"whole plan blob ({m['plan_bytes']} B)")
    ax.set(xlabel="round", ylabel="bytes per selected device")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_participation(m: dict, path: Path) -> None:
    import numpy as np

    plt, fig, ax = _figure()
    sel, acc = m.get("selected_per_round", []), m.get("devices_per_round", [])
    n = min(len(sel), len(acc))
    x = np.arange(1, n + 1)
    dropped = [max(s - a, 0) for s, a in zip(sel, acc)]
    ax.bar(x, acc[:n], 0.6, label="delta accepted", color="#2ca02c")
    ax.bar(x, dropped[:n], 0.6, bottom=acc[:n], label="selected, dropped", color="#d62728")
    for i, status in enumerate(m.get("round_status", [])[:n]):
        if status != "committed":
            ax.annotate(status, (x[i], sel[i]), ha="center", va="bottom", fontsize=8)
    if m.get("devices"):
        ax.axhline(m["devices"], color="#7f7f7f", ls=":", label=f"fleet size ({m['devices']})")
    ax.set(xlabel="round", ylabel="devices", ylim=(0, 1.2 * max([m.get("devices") or 0, *sel, 1])))
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_memory(rows: list[dict], path: Path) -> None:
    import numpy as np

    cols = [(k, label) for k, label in (("sram_bytes", "SRAM"), ("flash_bytes", "flash"),
                                        ("instructions_per_step", "instructions / step"))
            if any(r.get(k) is not None for r in rows)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(cols), 1, figsize=(7.0, 1.0 + 1.6 * len(cols)), dpi=100, sharex=True, squeeze=False)
    x = np.arange(len(rows))
    for ax, (k, label) in zip(axes[:, 0], cols):
        ax.bar(x, [r.get(k) or 0 for r in rows], color="#9467bd")
        ax.set_ylabel(label if k == "instructions_per_step" else f"{label} (KB)", fontsize=8)
        if k != "instructions_per_step":
            ax.yaxis.set_major_formatter(lambda v, _pos: f"{v / 1000:g}")
        ax.grid(True, axis="y", alpha=0.3)
    if len(rows) <= 40:  # NOTE: beyond that, names are unreadable; the per-device table has them
        axes[-1, 0].set_xticks(x, [r.get("device_id", str(i)) for i, r in enumerate(rows)], rotation=90, fontsize=6)
    axes[-1, 0].set_xlabel("device")
    _save(plt, fig, path)


# --- page -----------------------------------------------------------------------------------------------------


def awake_spans(events: list, device: str, until: float) -> list[tuple[float, float]]:
    """A device's awake intervals from its sleep/wake events (awake from 0 unless its first event is a sleep at 0)."""
    spans, start = [], 0.0
    for t, dev, what in events:
        if dev != device:
            continue
        if what == "sleep" and start is not None:
            if t > start:
                spans.append((start, t))
            start = None
        elif what == "wake" and start is None:
            start = t
    if start is not None and until > start:
        spans.append((start, until))
    return spans


def plot_behaviour(b: dict, path: Path) -> None:
    """One row per device: awake spans, tasks received, deltas sent, tasks lost (fleet/sim/paced.py events)."""
    rows = b.get("devices") or []
    ids = b.get("device_ids") or sorted({e[1] for e in b.get("events") or []})
    until = float(b.get("sim_seconds") or max([e[0] for e in b.get("events") or [[1.0]]] + [1.0]))
    plt, fig, ax = _figure(7.0, max(2.0, 0.22 * len(ids) + 1.0))
    marks = {"task": ("|", "#555555"), "delta": (".", "#2ca02c"), "dropout": ("x", "#d62728")}
    for y, dev in enumerate(ids):
        spans = awake_spans(b.get("events") or [], dev, until)
        ax.broken_barh([(a, e - a) for a, e in spans], (y - 0.35, 0.7), color="#aec7e8")
        for what, (mk, colour) in marks.items():
            ts = [e[0] for e in b.get("events") or [] if e[1] == dev and e[2] == what]
            ax.plot(ts, [y] * len(ts), mk, color=colour, ms=5, ls="none")
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels([f"{d} ({r.get('step_s', 0) * 1000:.0f} ms/step)" if i < len(rows) else d
                        for i, (d, r) in enumerate(zip(ids, rows + [{}] * len(ids)))], fontsize=7)
    ax.set(xlabel="simulated seconds", xlim=(0, until))
    _save(plt, fig, path)


def _cell(v: object) -> str:
    if v is None:
        return "<td>–</td>"
    if isinstance(v, float):
        return f"<td>{v:.3f}</td>" if abs(v) <= 1.0 else f"<td>{v:,.0f}</td>"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"<td>{v:,}</td>"
    return f"<td>{html.escape(str(v))}</td>"


def _table(header: list[str], rows: list[list[object]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:1em auto;padding:0 1em;color:#222;background:#fff}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}th,td{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.9em;color:#555}.note{color:#555}"""


def render_html(m: dict, plots: list[str]) -> str:
    """The page for metrics ``m`` showing the PNG files ``plots`` (names relative to the page)."""
    rows = m.get("per_device") or []
    series = round_series(m)
    means = m.get("accuracy_mean_per_device") or {}
    labels = {name: label for name, label, _ in (*METHODS, *PERSONAL_METHODS)}
    summary = [["method", "final accuracy (pooled)", "mean of per-device accuracies"]]
    for name, accs in series.items():
        summary.append([labels[name], accs[-1], means.get(name)])
    for name, v in means.items():  # replayed methods and new users: per-device means only
        if name not in series and name not in ("global", "personalized", "local", "centralized"):
            summary.append([labels.get(name, name.replace("_", " ")), None, v])
    facts = [["devices", m.get("devices")], ["rounds", m.get("rounds")], ["scheme", m.get("scheme")],
             ["personal tensors", ", ".join(m.get("personal") or []) or "none"],
             ["personalization (devices)", m.get("personalization") or "none"],
             ["methods used after memory fallback", ", ".join(f"{k}: {v}" for k, v in
                                                             (m.get("personal_methods") or {}).items()) or "–"],
             ["new users (held out)", ", ".join(m.get("new_users") or []) or "none"],
             ["initial accuracy", m.get("accuracy_initial")], ["plan blob (bytes)", m.get("plan_bytes")],
             ["plan SRAM (bytes)", m.get("plan_sram_bytes")], ["devices dropped (sum over rounds)",
                                                              m.get("devices_dropped")],
             ["devices offline at the end", m.get("devices_offline")], ["setup seconds", m.get("setup_seconds")],
             ["aggregator", m.get("aggregator") or "fedavg"], ["interrupted", str(bool(m.get("interrupted")))]]
    if m.get("stopped"):
        facts.append(["stopped early", m.get("stopped")])
    n = max(len(m.get("accuracy_per_round") or []), len(m.get("round_status") or []))
    per_round_header = ["round", "status", "selected", "accepted", "bytes up/dev", "bytes down/dev", "seconds",
                        *[labels[k] for k in series]]
    cols = [m.get(k) or [] for k in ("round_status", "selected_per_round", "devices_per_round",
                                     "bytes_up_per_device_round", "bytes_down_per_device_round", "round_seconds")]
    cols += list(series.values())
    if m.get("epsilon_per_round"):  # DP: cumulative epsilon after each committed round
        committed = iter(m["epsilon_per_round"])
        cols.append([next(committed, None) if s == "committed" else None for s in m.get("round_status") or []])
        per_round_header.append("DP epsilon (cumulative)")
    per_round = [[i + 1, *[c[i] if i < len(c) else None for c in cols]] for i in range(n)]
    dev_methods = device_methods(rows)
    extra = [k for k in ("board", "plan", "plan_budget", "plan_need_bytes", "personalization", "sram_bytes",
                         "flash_bytes", "instructions_per_step", "memory_source", "step_s", "duty", "awake_s",
                         "tasks_lost")
             if any(r.get(k) is not None for r in rows)]
    dev_header = ["device", "subject", "backend", "train", "test", "rounds in", *[labels[k] for k in dev_methods],
                  *extra]
    dev_rows = [[r.get("device_id"), r.get("subject"), r.get("backend"), r.get("n_train"), r.get("n_test"),
                 r.get("rounds_participated"), *[r.get(f"accuracy_{k}") for k in dev_methods],
                 *[r.get(k) for k in extra]] for r in rows]
    caps = {**PLOTS, **PERSONAL_PLOTS}
    figs = "\n".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(caps[p])}">'
                     f"<figcaption>{html.escape(caps[p])}</figcaption></figure>" for p in plots)
    errors = m.get("errors") or []
    err_html = ("<h2>Errors</h2><ul>" + "".join(f"<li>{html.escape(str(e))}</li>" for e in errors) + "</ul>"
                if errors else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TinyFleet run report</title>
<style>{CSS}</style></head><body>
<h1>TinyFleet run report</h1>
<p class="note">{html.escape(_accuracy_note(m))}</p>
<h2>Summary</h2>
{_table(summary[0], summary[1:], "summary")}
{_table(["run", "value"], facts, "facts")}
<h2>Plots</h2>
{figs}
{_continual_html(m)}
<h2>Per round</h2>
{_table(per_round_header, per_round, "rounds")}
<h2>Per device</h2>
{_table(dev_header, dev_rows, "devices") if rows else '<p class="note">No per-device table in metrics.json.</p>'}
{err_html}
</body></html>
"""


def _accuracy_note(m: dict) -> str:
    if m.get("source") == "serve":
        if not m.get("accuracy_per_round"):
            return ("A real fleet (tinyfleet serve) with no evaluation data: add `evaluation: {data: test.npz}` to "
                    "the config to score every round. Bytes are payloads seen by the coordinator (no MQTT headers).")
        return (f"A real fleet (tinyfleet serve): accuracy of the global model after each round on the config's "
                f"evaluation data ({m.get('evaluation_samples')} samples, held by the coordinator; no device sends "
                "data). Bytes are payloads seen by the coordinator (no MQTT headers).")
    return ("Accuracy is measured by the simulation harness on every device's held-out test slice (no device "
            "sends data). Pooled = all test windows together; local-only trains each device alone with the fleet's "
            "steps; centralized fine-tunes the fp32 model on every device's training data pooled, one epoch per "
            "round.")


def _continual_html(m: dict) -> str:
    rows = continual_rows(m)
    if not rows:
        return ""
    return ("<h2>Continual evaluation</h2><p class=\"note\">Prequential: each round a device first predicts its next "
            "chunk of stream, then trains on it. Forgetting: accuracy on the first user's held-out data just before "
            "the drift minus at the end. Recovery: rounds after the drift until prequential accuracy is back "
            "within 0.05 of its pre-drift mean.</p>"
            + _table(["case", "model", "final prequential", "mean prequential", "forgetting", "recovery rounds"],
                     rows, "continual"))


def write_report(run_dir: Path) -> Path:
    """Write ``index.html`` and its PNG plots into ``run_dir`` from its metrics.json; returns the page's path."""
    run_dir = Path(run_dir)
    m = load_metrics(run_dir)
    rows = m.get("per_device") or []
    plots = ["accuracy.png", "bytes.png", "participation.png"]
    plot_accuracy(m, run_dir / "accuracy.png")
    plot_bytes(m, run_dir / "bytes.png")
    plot_participation(m, run_dir / "participation.png")
    if device_methods(rows):
        plot_device_accuracy(rows, run_dir / "device_accuracy.png")
        plots.insert(1, "device_accuracy.png")
    if len(device_methods(rows)) > 1 and any(r.get(f"accuracy_{m}") is not None for r in rows
                                             for m in ("ditto", "finetune", "head", "bias")):
        plot_device_bars(rows, run_dir / "personal.png")
        plots.insert(2, "personal.png")
    if (m.get("continual") or {}).get("runs"):
        plot_prequential(m["continual"]["runs"], run_dir / "prequential.png")
        plots.insert(3, "prequential.png")
    if any(r.get(k) is not None for r in rows for k in ("sram_bytes", "flash_bytes", "instructions_per_step")):
        plot_memory(rows, run_dir / "memory.png")
        plots.append("memory.png")
    if (m.get("behaviour") or {}).get("devices"):
        plot_behaviour({**m["behaviour"], "device_ids": [r.get("device_id") for r in rows] or None},
                       run_dir / "behaviour.png")
        plots.append("behaviour.png")
    page = run_dir / "index.html"
    page.write_text(render_html(m, plots), encoding="utf-8")
    return page


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a `tinyfleet simulate --out` or `serve --out` directory "
                                              "(holds metrics.json)")


def run(args: argparse.Namespace) -> int:
    try:
        page = write_report(args.run_dir)
    except ReportError as e:
        print(f"tinyfleet report: {e}", file=sys.stderr)
        return 2
    print(page)
    return 0
