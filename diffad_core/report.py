"""The run report: tables (with the paper's numbers side by side) and figures, as Markdown + HTML.

Reads only ``metrics.parquet``, ``defect_metrics.parquet`` and the score partitions (see
``diffad_core.results``), so a report can be rebuilt without the models. Figures (the first images
and the weakest ones of each category) are drawn with numpy + PIL and ``overlay.py``'s jet overlay,
written as PNG files beside the report and embedded as base64 in the self-contained HTML.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from diffad_core import paper_numbers
from diffad_core import results as R
from diffad_core.overlay import overlay

ABLATION_LABELS: dict[str, str] = {
    "": "ensemble (Eq. 11)", "kl": "KL only", "feature": "feature only", "rgb": "RGB error",
    "padim": "PaDiM", "grid_h4": "features at H/4", "single_pass": "one UNet pass per t",
}
_MIN_PANEL = 160


# ----------------------------------------------------------------------------- formatting
def _pct(value: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal; "n/a" for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * float(value):.1f}"


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(float(value))


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _alpha_cell(row: Mapping[str, Any]) -> str:
    alpha = row.get("alpha")
    if alpha is None or (isinstance(alpha, float) and math.isnan(alpha)):
        return "n/a"
    source = row.get("alpha_source")
    return f"{float(alpha):.2f}" + (f" ({source})" if source else "")


def metrics_markdown_table(df: pd.DataFrame) -> str:
    """The per-category metrics (percent) as a Markdown table, mean row last."""
    headers = ["category", "pixel AUROC %", "PRO %", "image AUROC %", "n_test", "alpha", "status"]
    rows = [
        [str(r["category"]), _pct(r.get("pixel_auroc")), _pct(r.get("pro")),
         _pct(r.get("image_auroc")), str(int(r["n_test"])) if _present(r.get("n_test")) else "n/a",
         _alpha_cell(r), str(r.get("status") or "")]
        for r in _ordered(df).to_dict("records")
    ]
    return _md_table(headers, rows)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Category rows in their order, the mean row last."""
    is_mean = df["category"] == R.MEAN_ROW
    return pd.concat([df[~is_mean], df[is_mean]], ignore_index=True)


# ----------------------------------------------------------------------------- tables
def _main_table(df: pd.DataFrame, dataset: str) -> tuple[list[str], list[list[str]]]:
    headers = ["category", "pixel AUROC %", "PRO %", "image AUROC %", "n_test", "alpha (source)"]
    with_paper = dataset == "mvtec"
    if with_paper:
        headers += ["paper Ours pixel/PRO", "paper Ours* pixel/PRO"]
    headers.append("status")
    rows = []
    for r in _ordered(df).to_dict("records"):
        cat = str(r["category"])
        row = [cat, _pct(r.get("pixel_auroc")), _pct(r.get("pro")), _pct(r.get("image_auroc")),
               str(int(r["n_test"])) if _present(r.get("n_test")) else "n/a", _alpha_cell(r)]
        if with_paper:
            for method in ("Ours", "Ours*"):
                ref = paper_numbers.paper_row(cat, method)
                row.append(f"{ref[0]:.1f} / {ref[1]:.1f}" if ref else "n/a")
        row.append(str(r.get("status") or ""))
        rows.append(row)
    return headers, rows


def _ablation_table(df: pd.DataFrame) -> tuple[list[str], list[list[str]]] | None:
    present = [a for a in R.ABLATIONS
               if any(f"{m}_{a}" in df.columns for m in ("pixel_auroc", "pro", "image_auroc"))]
    if not present:
        return None
    headers = ["category", "scorer", "pixel AUROC %", "PRO %", "image AUROC %"]
    rows = []
    for r in _ordered(df).to_dict("records"):
        for abl in [""] + present:
            suffix = f"_{abl}" if abl else ""
            rows.append([str(r["category"]), ABLATION_LABELS.get(abl, abl),
                         _pct(r.get(f"pixel_auroc{suffix}")), _pct(r.get(f"pro{suffix}")),
                         _pct(r.get(f"image_auroc{suffix}"))])
    return headers, rows


# MVTec-AD: 15 categories, 1725 test images (Bergmann et al., CVPR 2019), for the projection.
_MVTEC_CATEGORIES, _MVTEC_TEST_IMAGES = 15, 1725
_PROJECTION_DEVICES = (1, 2, 4, 8, 15)


def _value(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _reconstructed(run_dir: Path, category: str) -> int:
    """How many of the category's test images have a reconstruction in its partition."""
    try:
        rows = R.read_scores(run_dir, [category], columns=["category", "reconstruction"])
    except FileNotFoundError:
        return 0
    return int(rows["reconstruction"].notna().sum())


def _stage_seconds(run_dir: Path, df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per category (the mean row left out): seconds spent training, scoring (ms/image x test
    images) and reconstructing (ms/image x reconstructed images), None where not measured."""
    out = []
    for r in _ordered(df).to_dict("records"):
        if r["category"] == R.MEAN_ROW:
            continue
        n_test = _value(r, "n_test") or 0.0
        n_recon = _reconstructed(run_dir, str(r["category"]))
        score_ms, recon_ms = _value(r, "score_ms_per_image"), _value(r, "reconstruct_ms_per_image")
        stage = {"category": str(r["category"]), "train": _value(r, "train_seconds"),
                 "score_ms": score_ms, "score": None if score_ms is None else score_ms * n_test / 1000,
                 "reconstruct_ms": recon_ms, "n_test": n_test, "n_reconstructed": n_recon,
                 "reconstruct": None if recon_ms is None else recon_ms * n_recon / 1000,
                 "model_version": r.get("model_version")}
        measured = [stage[k] for k in ("train", "score", "reconstruct") if stage[k] is not None]
        stage["total"] = sum(measured) if measured else None
        out.append(stage)
    return out


def _timing_table(stages: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["category", "train s", "score ms/image", "score s", "reconstruct ms/image",
               "reconstruct s", "total s", "model version"]
    rows = [[st["category"], _num(st["train"]), _num(st["score_ms"]), _num(st["score"]),
             _num(st["reconstruct_ms"]), _num(st["reconstruct"]), _num(st["total"]),
             str(st["model_version"] or "n/a")] for st in stages]

    def total(key: str) -> float | None:
        values = [st[key] for st in stages if st[key] is not None]
        return sum(values) if values else None

    def per_image(key: str, count: str) -> float | None:
        n = sum(st[count] for st in stages if st[key] is not None)
        return 1000 * total(key) / n if n and total(key) is not None else None

    rows.append(["total", _num(total("train")), _num(per_image("score", "n_test")), _num(total("score")),
                 _num(per_image("reconstruct", "n_reconstructed")), _num(total("reconstruct")),
                 _num(total("total")), ""])
    return headers, rows


def _projection(stages: list[dict[str, Any]]) -> tuple[str, tuple[list[str], list[list[str]]]] | None:
    """The full MVTec-AD benchmark at this run's measured per-stage rates: per category the mean
    training time, plus its share of the 1725 test images scored and reconstructed (as large a
    share reconstructed as in this run); one category per device at a time on N devices."""
    train = [st["train"] for st in stages if st["train"] is not None]
    scored = [st for st in stages if st["score"] is not None and st["n_test"]]
    if not train and not scored:
        return None
    n_test = sum(st["n_test"] for st in scored)
    score_s = sum(st["score"] for st in scored) / n_test if n_test else 0.0
    recon = [st for st in stages if st["reconstruct"] is not None and st["n_test"]]
    recon_s = (sum(st["reconstruct"] for st in recon) / sum(st["n_test"] for st in recon)) if recon else 0.0
    per_image = score_s + recon_s  # seconds per test image (reconstruction at this run's share)
    per_category = (sum(train) / len(train) if train else 0.0) + _MVTEC_TEST_IMAGES / _MVTEC_CATEGORIES * per_image
    note = (f"Projected full MVTec-AD benchmark ({_MVTEC_CATEGORIES} categories, {_MVTEC_TEST_IMAGES} "
            f"test images) at this run's measured rates: {sum(train) / len(train) if train else 0:.1f} s "
            f"training per category{'' if train else ' (not measured in this run)'}, "
            f"{1000 * score_s:.1f} ms scoring and {1000 * recon_s:.1f} ms reconstructing per test "
            "image; categories run one per device at a time, on N devices like this run's.")
    rows = [[str(n), _num(math.ceil(_MVTEC_CATEGORIES / n) * per_category / 3600, "{:.2f}")]
            for n in _PROJECTION_DEVICES]
    return note, (["devices", "hours"], rows)


def _failure_table(run_dir: Path, df: pd.DataFrame) -> tuple[list[str], list[list[str]]] | None:
    """Per category and defect kind, from ``defect_metrics.parquet`` (computed from the partitions
    when the run was evaluated before that file existed)."""
    try:
        kinds = R.read_defect_metrics(run_dir)
    except FileNotFoundError:
        present = set(R.list_categories_in_run(run_dir))
        kinds = R.evaluate_defect_kinds(run_dir, [c for c in df["category"] if c in present])
    if kinds.empty:
        return None
    order = {c: k for k, c in enumerate(df["category"])}
    kinds = kinds.assign(_o=kinds["category"].map(order)).sort_values(["_o", "defect_type"])
    headers = ["category", "defect kind", "n images", "n good", "pixel AUROC %", "PRO %",
               "image AUROC %", "status"]
    rows = [[str(r["category"]), str(r["defect_type"]), str(r["n_images"]), str(r["n_good"]),
             _pct(r["pixel_auroc"]), _pct(r["pro"]), _pct(r["image_auroc"]), str(r["status"])]
            for r in kinds.to_dict("records")]
    return headers, rows


_FAILURE_NOTE = ("Each defect kind's images scored together with all normal images of their "
                 "category: the lowest rows are the failure modes.")
_FIGURE_NOTE = ("Per row: input, ground truth, anomaly map over the input (one colour scale per "
                "category, jet: blue low, red high), reconstruction (Algorithm 1) when made. First "
                "a few images (anomalous first), then the category's weakest images, marked "
                "\"weak\": lowest pixel AUROC over their own pixels, anomalous images that most normal "
                "images outscore, and the highest-scoring normal image.")


def _paper_reference_lines(dataset: str) -> list[str]:
    if dataset != "mvtec":
        return []
    lines = [f"Paper mean (Table 1): Ours {paper_numbers.MEAN['Ours'][0]} / "
             f"{paper_numbers.MEAN['Ours'][1]}, Ours* {paper_numbers.MEAN['Ours*'][0]} / "
             f"{paper_numbers.MEAN['Ours*'][1]} (pixel AUROC / PRO, %); unified model Ours "
             f"{paper_numbers.UNIFIED['Ours'][0]} / {paper_numbers.UNIFIED['Ours'][1]}; "
             f"image AUROC about {paper_numbers.OURS_IMAGE_AUROC_APPROX:.0f} at alpha 0.5."]
    refs = ", ".join(f"{k} {v[0]} / {v[1]} / {v[2]}" for k, v in paper_numbers.OTHER_REFERENCES.items())
    lines.append(f"Other references (image AUROC / pixel AUROC / PRO, %): {refs}.")
    return lines


# ----------------------------------------------------------------------------- figures
def _load_input(row: Mapping[str, Any], data_root: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    if row.get("input_image") is not None:
        img = row["input_image"]
    elif data_root is not None and (data_root / row["rel_path"]).is_file():
        with Image.open(data_root / row["rel_path"]) as im:
            img = np.asarray(im.convert("RGB"))
    else:
        return None
    if img.shape[:2] != shape:
        img = np.asarray(Image.fromarray(img).resize((shape[1], shape[0]), Image.BILINEAR))
    return img


def _panel(img: np.ndarray | None, size: int, caption: str) -> Image.Image:
    """An RGB panel of ``size`` px with a caption strip below; grey with "n/a" if no image."""
    if img is None:
        im = Image.new("RGB", (size, size), (128, 128, 128))
        ImageDraw.Draw(im).text((size // 2 - 10, size // 2 - 5), "n/a", fill=(255, 255, 255))
    else:
        im = Image.fromarray(img).resize((size, size), Image.NEAREST)
    out = Image.new("RGB", (size, size + 16), (255, 255, 255))
    out.paste(im, (0, 0))
    ImageDraw.Draw(out).text((3, size + 2), caption[: size // 6], fill=(0, 0, 0))
    return out


def _interleave_by_type(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First image of each defect type, then the second of each, ... (order of appearance)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["defect_type"], []).append(row)
    out: list[dict[str, Any]] = []
    depth = max((len(g) for g in groups.values()), default=0)
    for i in range(depth):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def _figure_row(row: Mapping[str, Any], reason: str | None, has_recon: bool, lo: float, hi: float,
                data_root: Path | None) -> Image.Image:
    """Input, ground truth, the anomaly map over the input, [reconstruction] side by side."""
    amap = row["anomaly_map"]
    shape = amap.shape
    size = max(max(shape), _MIN_PANEL)
    inp = _load_input(row, data_root, shape)
    # overlay() takes images in [-1, 1]; an input-less row is drawn over mid grey
    base = inp.astype(np.float32) / 127.5 - 1.0 if inp is not None else np.zeros(shape + (3,))
    over = overlay(base, amap, opacity=0.5, vmin=lo, vmax=hi)
    mask = row["mask"]
    gt = None if mask is None else np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    if gt is None and row["label"] == 0:
        gt = np.zeros(shape + (3,), np.uint8)
    name = Path(row["rel_path"]).name
    panels = [_panel(inp, size, f"{row['defect_type']}/{name}"),
              _panel(gt, size, f"weak: {reason}" if reason else "ground truth"),
              _panel(over, size, f"map, score {row['image_score']:.3g}")]
    if has_recon:
        panels.append(_panel(row["reconstruction"], size, "reconstruction"))
    strip = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1),
                              panels[0].height), (255, 255, 255))
    for k, p in enumerate(panels):
        strip.paste(p, (k * (p.width + 4), 0))
    return strip


def category_figure(run_dir: Path, category: str, out_path: Path, *, n_images: int = 3,
                    n_weakest: int = 3, data_root: Path | None = None) -> tuple[Path, pd.DataFrame] | None:
    """Rows of (input, ground truth, anomaly-map overlay, reconstruction): first ``n_images``
    images (anomalous ones first, reconstructed ones first, one defect type after another), then
    the category's ``n_weakest`` weakest images (``results.weakest_images``) not shown yet. The
    map colour scale is shared by the category (0.5th to 99.5th percentile of its pixels).
    Returns the PNG path and the weakest images' table."""
    index: list[dict[str, Any]] = []
    samples: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    for i, row in enumerate(R.iter_maps(run_dir, [category], maps=("anomaly_map", "reconstruction"))):
        flat = row["anomaly_map"].ravel()
        samples.append(rng.choice(flat, size=min(flat.size, 4096), replace=False))
        index.append({"i": i, "label": row["label"], "defect_type": row["defect_type"],
                      "rel_path": row["rel_path"], "recon": row["reconstruction"] is not None})
    if not index:
        return None
    lo, hi = (float(v) for v in np.percentile(np.concatenate(samples), [0.5, 99.5]))
    anomalous = [r for r in index if r["label"] == 1]
    ordered = (_interleave_by_type([r for r in anomalous if r["recon"]])
               + _interleave_by_type([r for r in anomalous if not r["recon"]])
               + [r for r in index if r["label"] == 0])
    n_good = 1 if n_weakest >= 2 else 0
    weak = R.weakest_images(run_dir, category, n_anomalous=n_weakest - n_good, n_good=n_good)
    reasons = dict(zip(weak["rel_path"], weak["reason"]))
    position = {r["rel_path"]: r["i"] for r in index}
    shown = [r["i"] for r in ordered[:n_images]]
    shown += [position[p] for p in weak["rel_path"] if position[p] not in shown]
    wanted = {i: k for k, i in enumerate(shown)}
    chosen: list[dict[str, Any]] = [{}] * len(wanted)
    for i, row in enumerate(R.iter_maps(run_dir, [category], maps=("anomaly_map", "mask",
                                                                   "reconstruction", "input_image"))):
        if i in wanted:
            chosen[wanted[i]] = row
    has_recon = any(r["reconstruction"] is not None for r in chosen)
    rows_img = [_figure_row(r, reasons.get(r["rel_path"]), has_recon, lo, hi, data_root)
                for r in chosen]
    fig = Image.new("RGB", (max(r.width for r in rows_img),
                            sum(r.height for r in rows_img) + 4 * (len(rows_img) - 1)), (255, 255, 255))
    y = 0
    for r in rows_img:
        fig.paste(r, (0, y))
        y += r.height + 4
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out_path, format="PNG")
    return out_path, weak


def _weakest_table(weak: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["image", "defect kind", "why", "image score", "pixel AUROC % (own pixels)",
               "score overlap %"]
    rows = [[str(r["rel_path"]), str(r["defect_type"]), str(r["reason"]),
             _num(r["image_score"], "{:.3g}"), _pct(r["pixel_auroc"]), _pct(r["score_overlap"])]
            for r in weak.to_dict("records")]
    return headers, rows


# ----------------------------------------------------------------------------- report
def _provenance_lines(provenance: Mapping[str, Any] | None, weights_note: str | None) -> list[str]:
    lines = []
    if provenance:
        sha = provenance.get("git_sha") or "unknown"
        if provenance.get("git_dirty"):
            sha += " (dirty work tree)"
        lines += [
            f"git SHA: {sha}",
            f"config hash: {provenance.get('config_hash', 'n/a')}",
            f"dataset manifest hash: {provenance.get('manifest_hash') or 'n/a'}",
            f"seed: {provenance.get('seed', 'n/a')}; preset: {provenance.get('preset', 'n/a')}",
        ]
        versions = provenance.get("versions") or {}
        if versions:
            lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        device = provenance.get("device") or {}
        if device:
            lines.append(f"device: {device.get('cuda_name') or 'CPU'}"
                         f"{'; host ' + provenance['hostname'] if provenance.get('hostname') else ''}")
        if provenance.get("timestamp_utc"):
            lines.append(f"created (UTC): {provenance['timestamp_utc']}")
    else:
        lines.append("no provenance was given for this run")
    lines.append(f"weights: {weights_note or 'not stated'}")
    return lines


def _decision_lines(registry_decisions: Sequence[Any] | Mapping[str, Any] | None) -> list[str]:
    if not registry_decisions:
        return []
    items = registry_decisions.items() if isinstance(registry_decisions, Mapping) \
        else enumerate(registry_decisions)
    out = []
    for key, value in items:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        out.append(text if isinstance(key, int) else f"{key}: {text}")
    return out


def _dataset_note(dataset: str) -> str | None:
    if dataset == "mvtec":
        return None
    if dataset == "synthetic":
        return ("This run used the synthetic MVTec-format dataset: its categories and defects are "
                "generated, so the paper's MVTec-AD numbers do not apply and are not shown; the "
                "numbers here only show that the pipeline works end to end.")
    return (f"Dataset {dataset!r}: the paper's per-class MVTec-AD table does not apply and is not "
            "shown.")


def build_report(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dataset: str,
    title: str = "diffad report",
    registry_decisions: Sequence[Any] | Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    weights_note: str | None = None,
    data_root: str | Path | None = None,
    figures_per_category: int = 3,
    weakest_per_category: int = 3,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``figures/<category>.png`` into ``out_dir``.

    Each figure shows the first ``figures_per_category`` images, then the category's
    ``weakest_per_category`` weakest images (``results.weakest_images``: anomalous ones, plus the
    highest-scoring normal image when 2 or more) that are not shown yet. ``data_root``: where to
    find the input images when the partition has no ``input_image`` (optional; without it the
    input panel is grey). Returns ``{"markdown": Path, "html": Path, "figures": {category: Path}}``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    df = R.read_metrics(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root is not None else None
    present = set(R.list_categories_in_run(run_dir))
    figures: dict[str, Path] = {}
    weakest: dict[str, tuple[list[str], list[list[str]]]] = {}
    for cat in df["category"]:
        if cat != R.MEAN_ROW and cat in present:
            made = category_figure(run_dir, cat, out_dir / "figures" / f"{cat}.png",
                                   n_images=figures_per_category, n_weakest=weakest_per_category,
                                   data_root=root)
            if made is not None:
                figures[cat] = made[0]
                weakest[cat] = _weakest_table(made[1])

    run_id = run_dir.resolve().name
    main = _main_table(df, dataset)
    ablation = _ablation_table(df)
    stages = _stage_seconds(run_dir, df)
    timing = _timing_table(stages)
    projection = _projection(stages)
    failures = _failure_table(run_dir, df)
    note = _dataset_note(dataset)
    refs = _paper_reference_lines(dataset)
    prov = _provenance_lines(provenance, weights_note)
    decisions = _decision_lines(registry_decisions)
    scale = "Metrics in percent. " + (
        "Paper columns: Table 1 of Lu et al. (ICCV 2023), pixel AUROC / PRO." if dataset == "mvtec"
        else "")

    md = [f"# {title}", "", f"Run `{run_id}`, dataset `{dataset}`.", ""]
    if note:
        md += [f"> {note}", ""]
    md += ["## Results per category", "", scale.strip(), "", _md_table(*main), ""]
    for line in refs:
        md += [line, ""]
    if ablation:
        md += ["## Ablations", "", _md_table(*ablation), ""]
    if failures:
        md += ["## Failure modes per defect kind", "", _FAILURE_NOTE, "", _md_table(*failures), ""]
    md += ["## Timings", "", _md_table(*timing), ""]
    if projection:
        md += [projection[0], "", _md_table(*projection[1]), ""]
    if figures:
        md += ["## Figures", "", _FIGURE_NOTE, ""]
        for cat, p in figures.items():
            md += [f"### {cat}", "", f"![{cat}](figures/{p.name})", ""]
            if weakest[cat][1]:
                md += ["Weakest images:", "", _md_table(*weakest[cat]), ""]
    md += ["## Provenance", ""] + [f"- {line}" for line in prov] + [""]
    if decisions:
        md += ["## Registry decisions", ""] + [f"- {line}" for line in decisions] + [""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    h = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
         f"<title>{html.escape(title)}</title><style>",
         "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}",
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
         "text-align:right}td:first-child,th:first-child{text-align:left}"
         ".note{background:#fff4d6;padding:.6em;border-left:4px solid #e0a800}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p>Run <code>{html.escape(run_id)}</code>, dataset <code>{html.escape(dataset)}</code>.</p>"]
    if note:
        h.append(f"<p class='note'>{html.escape(note)}</p>")
    h += ["<h2>Results per category</h2>", f"<p>{html.escape(scale)}</p>", _html_table(*main)]
    h += [f"<p>{html.escape(line)}</p>" for line in refs]
    if ablation:
        h += ["<h2>Ablations</h2>", _html_table(*ablation)]
    if failures:
        h += ["<h2>Failure modes per defect kind</h2>", f"<p>{html.escape(_FAILURE_NOTE)}</p>",
              _html_table(*failures)]
    h += ["<h2>Timings</h2>", _html_table(*timing)]
    if projection:
        h += [f"<p>{html.escape(projection[0])}</p>", _html_table(*projection[1])]
    if figures:
        h += ["<h2>Figures</h2>", f"<p>{html.escape(_FIGURE_NOTE)}</p>"]
        for cat, p in figures.items():
            b64 = base64.b64encode(p.read_bytes()).decode("ascii")
            h.append(f"<h3>{html.escape(cat)}</h3><img alt='{html.escape(cat)}' "
                     f"src='data:image/png;base64,{b64}'>")
            if weakest[cat][1]:
                h.append(_html_table(*weakest[cat]))
    h += ["<h2>Provenance</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in prov] + ["</ul>"]
    if decisions:
        h += ["<h2>Registry decisions</h2><ul>"]
        h += [f"<li>{html.escape(line)}</li>" for line in decisions] + ["</ul>"]
    h.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("\n".join(h))
    return {"markdown": md_path, "html": html_path, "figures": figures}
