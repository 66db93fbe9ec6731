"""``pifa report``: Markdown tables and PNG plots from the JSON results of compress, eval and bench.

Understood inputs: quality sweeps (``{"rows": [{"model", "method", "density", ...}]}``),
``pifa bench layer`` / ``pifa bench model`` / ``pifa eval`` JSON (``"kind"``), the demo, and
``compression_report.json``. Anything else is an error naming the file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..validate import first_line

QUALITY_METRICS = (("heldout", "ppl"), ("wikitext", "ppl"), ("cosine", None), ("top1_agreement", None), ("ppl", None))


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Scalars of ``row``, with one level of nested ``ppl`` values lifted (``heldout.ppl`` -> ``heldout_ppl``)."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            if "ppl" in value:
                flat[f"{key}_ppl"] = value["ppl"]
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _kind(data: Any, path: Path) -> str:
    if isinstance(data, dict) and data.get("kind") in ("bench-layer", "bench-model", "eval", "demo"):
        return data["kind"]
    if (isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]
            and isinstance(data["rows"][0], dict) and "method" in data["rows"][0]):
        return "quality"
    if isinstance(data, dict) and "modules" in data and "config" in data:
        return "compression"
    raise ValueError(f"{str(path)!r} is not a pifa results file "
                     "(quality sweep, bench, eval, demo or compression report)")


def _rows(kind: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "eval":
        return [_flat(r) for r in data.get("perplexity", [])] + [
            {"task": t, **m} for t, m in data.get("zero_shot", {}).items()] + (
            [_flat(data["fidelity"])] if "fidelity" in data else [])
    if kind == "compression":
        return [{"method": data["config"].get("method"), "target": data["config"].get("density"),
                 "density": data["density"], "modules": len(data["modules"]), "seconds": data.get("seconds")}]
    return [_flat(r) for r in data["rows"]]


def _plot_quality(rows: list[dict[str, Any]], out: Path, stem: str, plt: Any) -> list[Path]:
    """Per model: metric vs density per method, or sorted bars when every method has one density."""
    files = []
    for model in dict.fromkeys(r.get("model", "model") for r in rows):
        mine = [r for r in rows if r.get("model", "model") == model]
        metric = next((f"{k}_ppl" if sub else k for k, sub in QUALITY_METRICS
                       if (f"{k}_ppl" if sub else k) in mine[0]), None)
        if metric is None:
            continue
        compressed = [r for r in mine if r["method"] != "dense"]
        dense = next((r[metric] for r in mine if r["method"] == "dense"), None)
        path = out / f"{stem}_{_slug(model)}.png"
        if _allocation_grid(compressed):
            files.append(_quality_panels(compressed, dense, metric, str(model), path, plt))
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        if len({r["density"] for r in compressed}) == 1:
            _quality_bars(ax, compressed, dense, metric)
        else:
            _quality_lines(ax, compressed, dense, metric)
        ax.set_title(str(model))
        ax.grid(alpha=0.3)
        files.append(_save(fig, path, plt))
    return files


def _method_and_allocation(row: dict[str, Any]) -> tuple[str, str]:
    """("mpifa", "sensitivity") from method "mpifa/sensitivity" or method "mpifa" + allocation "sensitivity"."""
    method, _, allocation = _label(row).partition("/")
    return method, allocation or "uniform"


def _allocation_grid(rows: list[dict[str, Any]]) -> bool:
    """Several low-rank methods, each under several allocations, at several densities: one panel per method."""
    low_rank = [_method_and_allocation(r) + (r["density"],) for r in rows if "@" not in r["method"]]
    return all(len({key[i] for key in low_rank}) > 1 for i in range(3))


def _quality_panels(rows: list[dict[str, Any]], dense: float | None, metric: str, title: str, path: Path,
                    plt: Any) -> Path:
    """A panel per low-rank method with a line per allocation; sparse (N:M) rows as reference points in each."""
    keyed = [(_method_and_allocation(r), r) for r in rows if "@" not in r["method"]]
    methods = list(dict.fromkeys(key[0] for key, _ in keyed))
    allocations = list(dict.fromkeys(key[1] for key, _ in keyed))
    sparse = [r for r in rows if "@" in r["method"]]
    colours = {name: f"C{i}" for i, name in enumerate(allocations + [r["method"] for r in sparse])}
    fig, axes = plt.subplots(1, len(methods), figsize=(2.9 * len(methods) + 0.6, 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):  # each its own scale: one broken method must not flatten the rest
        for allocation in allocations:
            points = sorted((r["density"], r[metric]) for key, r in keyed if key == (method, allocation))
            if points:
                ax.plot(*zip(*points), marker="o", label=allocation, color=colours[allocation])
        for row in sparse:
            ax.plot(row["density"], row[metric], marker="x", linestyle="none", markersize=8, label=row["method"],
                    color=colours[row["method"]])
        if dense is not None:
            ax.axhline(dense, color="gray", linestyle="--", label="dense")
        ax.set(title=method, xlabel="density")
        if metric.endswith("ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: rank allocation per method", fontsize=10)
    return _save(fig, path, plt)


def _label(row: dict[str, Any]) -> str:
    """The method, with its rank allocation when that is not uniform (e.g. mpifa/sensitivity)."""
    allocation = row.get("allocation")
    if allocation in (None, "-", "uniform") or "/" in row["method"]:
        return row["method"]
    return f"{row['method']}/{allocation}"


def _quality_lines(ax: Any, rows: list[dict[str, Any]], dense: float | None, metric: str) -> None:
    for label in dict.fromkeys(map(_label, rows)):
        ax.plot(*zip(*sorted((r["density"], r[metric]) for r in rows if _label(r) == label)),
                marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set(xlabel="density (kept fraction of the targeted weights)", ylabel=metric)
    if metric.endswith("ppl"):
        ax.set_yscale("log")
    ax.legend()


def _quality_bars(ax: Any, rows: list[dict[str, Any]], dense: float | None, metric: str) -> None:
    """One density: a bar per method, best on top; sparse (METHOD@PATTERN) and low-rank coloured apart."""
    from matplotlib.patches import Patch

    lower_is_better = metric.endswith("ppl")
    ranked = sorted(rows, key=lambda r: r[metric], reverse=lower_is_better)  # barh draws the last on top
    colours = ["tab:orange" if "@" in r["method"] else "tab:blue" for r in ranked]
    ax.barh([_label(r) for r in ranked], [r[metric] for r in ranked], color=colours)
    handles = [Patch(color="tab:blue", label="low-rank"), Patch(color="tab:orange", label="sparse (N:M)")]
    if dense is not None:
        handles.insert(0, ax.axvline(dense, color="gray", linestyle="--", label="dense"))
    ax.legend(handles=handles, loc="lower right")
    values = [r[metric] for r in ranked] + ([dense] if dense is not None else [])
    if lower_is_better:
        ax.set_xlim(min(values) * 0.9, max(values) * 1.03)
    ax.set(xlabel=f"{metric} at density {ranked[0]['density']} ({'lower' if lower_is_better else 'higher'} is better)")


def _plot_ratios(rows: list[dict[str, Any]], out: Path, stem: str, plt: Any, label_keys: tuple[str, ...]) -> list[Path]:
    ratios = [k for k in rows[0] if k.endswith(("/pifa", "_x", "speedup"))]
    if not ratios:
        return []
    labels = [" ".join(str(r[k]) for k in label_keys if k in r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 4))
    width = 0.8 / len(ratios)
    for i, key in enumerate(ratios):
        ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width, label=key)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([x + width * (len(ratios) - 1) / 2 for x in range(len(rows))], labels, rotation=30, ha="right")
    ax.set(ylabel="speed ratio (higher is faster)")
    ax.legend()
    return [_save(fig, out / f"{stem}.png", plt)]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(text)).strip("-").lower()


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(kind: str, rows: list[dict[str, Any]], out: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if kind == "quality":
        return _plot_quality(rows, out, stem, plt)
    if kind in ("bench-layer", "bench-model", "demo") and rows:
        return _plot_ratios(rows, out, stem, plt, ("dtype", "tokens", "model", "method"))
    return []


def _is_number(value: Any) -> bool:
    """A finite int or float that converts to a float (a 400-digit integer does not: OverflowError in plotting)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"(an integer of {len(str(abs(value)))} digits)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checked_rows(kind: str, data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The table rows of one results file, with the fields the tables and plots use checked."""
    try:
        rows = _rows(kind, data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{name!r} looks like a {kind} results file but a field is missing or malformed "
                         f"({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(rows):
        if kind == "quality":
            if not isinstance(row.get("method"), str) or not _is_number(row.get("density")):
                raise ValueError(f"{name!r}: row {i} of the quality sweep needs a 'method' name "
                                 f"and a numeric 'density' (a finite number; it has {_shown(row.get('density'))})")
            for metric in [f"{k}_ppl" if sub else k for k, sub in QUALITY_METRICS]:
                if metric in row and not _is_number(row[metric]):
                    raise ValueError(f"{name!r}: row {i} has a non-numeric {metric} {_shown(row[metric])} "
                                     "(a finite number is needed)")
        if kind in ("bench-layer", "bench-model", "demo"):
            for key, value in row.items():
                if key.endswith(("/pifa", "_x", "speedup")) and not _is_number(value):
                    raise ValueError(f"{name!r}: row {i} has a non-numeric {key} {_shown(value)} "
                                     "(a finite number is needed)")
    return rows


def write_report(results: list[str], out: str) -> Path:
    """Write ``out/report.md`` (a section and a table per results file) and its PNG plots.

    Every file is read and checked before anything is written; a failure leaves no new folder behind.
    """
    from ..io import check_writable_folder, missing_parents, remove_created, writing_error

    out_dir = Path(out)
    sections = ["# pifa report\n"]
    loaded = []
    for name in results:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"results file {name!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise ValueError(f"{name!r} nests its JSON too deeply to be a pifa results file") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer beyond Python's 4300 digits
            first = first_line(exc, 200)
            raise ValueError(f"{name!r} is not valid JSON: {first}") from None
        kind = _kind(data, path)
        loaded.append((path, kind, _checked_rows(kind, data, name)))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out!r} exists and is not a folder")
    check_writable_folder(out_dir, "--out")
    created = [out_dir, *missing_parents(out_dir)] if not out_dir.exists() else []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, kind, rows in loaded:
            sections.append(f"## {path.name} ({kind})\n\n{_markdown(rows)}")
            for png in _plots(kind, rows, out_dir, _slug(path.stem)):
                sections.append(f"![{png.stem}]({png.name})\n")
        (out_dir / "report.md").write_text("\n".join(sections))
    except BaseException as exc:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
            remove_created(created[1:])
        if isinstance(exc, OSError):
            raise writing_error(out_dir, exc) from None
        raise
    return out_dir / "report.md"
