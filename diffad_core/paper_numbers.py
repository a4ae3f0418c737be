"""The numbers the paper reports (METHOD.md §6), as data for the report's side-by-side tables.

All values are percentages. Per-class table: (pixel AUROC, PRO) on MVTec-AD for each method
("Ours" = alpha 0.5, "Ours*" = alpha chosen per category). Copied verbatim from METHOD.md §6.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("SPADE", "PaDiM", "CFlow", "DRAEM", "UniAD", "Ours", "Ours*")

# class -> method -> (pixel AUROC %, PRO %)
PER_CLASS: dict[str, dict[str, tuple[float, float]]] = {
    "bottle": {
        "SPADE": (98.4, 95.5),
        "PaDiM": (98.5, 95.3),
        "CFlow": (99.0, 96.8),
        "DRAEM": (99.1, 97.2),
        "UniAD": (98.0, 93.8),
        "Ours": (97.7, 95.0),
        "Ours*": (97.7, 95.0),
    },
    "cable": {
        "SPADE": (97.2, 90.9),
        "PaDiM": (98.1, 91.1),
        "CFlow": (97.7, 93.5),
        "DRAEM": (94.7, 76.0),
        "UniAD": (97.2, 86.3),
        "Ours": (95.2, 88.7),
        "Ours*": (95.6, 89.5),
    },
    "capsule": {
        "SPADE": (99.0, 93.7),
        "PaDiM": (98.8, 92.3),
        "CFlow": (99.0, 93.4),
        "DRAEM": (94.3, 91.7),
        "UniAD": (98.7, 90.8),
        "Ours": (98.0, 90.1),
        "Ours*": (97.5, 91.4),
    },
    "carpet": {
        "SPADE": (97.5, 94.7),
        "PaDiM": (98.9, 94.5),
        "CFlow": (99.3, 97.7),
        "DRAEM": (95.5, 92.9),
        "UniAD": (98.4, 94.5),
        "Ours": (98.9, 95.8),
        "Ours*": (98.9, 95.8),
    },
    "grid": {
        "SPADE": (93.7, 86.7),
        "PaDiM": (96.1, 90.5),
        "CFlow": (99.0, 96.1),
        "DRAEM": (99.7, 98.4),
        "UniAD": (97.5, 92.6),
        "Ours": (99.1, 98.1),
        "Ours*": (99.1, 98.4),
    },
    "hazelnut": {
        "SPADE": (99.1, 95.4),
        "PaDiM": (98.4, 84.0),
        "CFlow": (98.9, 96.7),
        "DRAEM": (99.7, 98.1),
        "UniAD": (98.2, 93.0),
        "Ours": (97.7, 89.5),
        "Ours*": (97.3, 91.1),
    },
    "leather": {
        "SPADE": (97.6, 97.2),
        "PaDiM": (99.2, 97.9),
        "CFlow": (99.7, 99.4),
        "DRAEM": (98.6, 98.0),
        "UniAD": (98.7, 97.2),
        "Ours": (99.5, 99.1),
        "Ours*": (99.5, 99.1),
    },
    "metal_nut": {
        "SPADE": (98.1, 94.4),
        "PaDiM": (98.0, 92.9),
        "CFlow": (98.6, 91.7),
        "DRAEM": (99.5, 94.1),
        "UniAD": (94.9, 87.1),
        "Ours": (96.8, 93.0),
        "Ours*": (96.8, 93.0),
    },
    "pill": {
        "SPADE": (96.5, 94.6),
        "PaDiM": (97.0, 95.3),
        "CFlow": (99.0, 95.4),
        "DRAEM": (97.6, 88.9),
        "UniAD": (96.2, 95.3),
        "Ours": (92.5, 94.5),
        "Ours*": (92.5, 94.5),
    },
    "screw": {
        "SPADE": (98.9, 96.0),
        "PaDiM": (98.7, 94.6),
        "CFlow": (98.9, 95.3),
        "DRAEM": (97.6, 98.2),
        "UniAD": (98.9, 95.3),
        "Ours": (99.0, 95.6),
        "Ours*": (99.0, 95.6),
    },
    "tile": {
        "SPADE": (87.4, 75.9),
        "PaDiM": (94.3, 93.7),
        "CFlow": (98.0, 94.3),
        "DRAEM": (99.2, 98.9),
        "UniAD": (92.0, 79.6),
        "Ours": (92.1, 95.1),
        "Ours*": (92.1, 95.1),
    },
    "toothbrush": {
        "SPADE": (97.9, 93.5),
        "PaDiM": (98.7, 94.3),
        "CFlow": (98.9, 95.1),
        "DRAEM": (98.1, 90.3),
        "UniAD": (98.3, 88.2),
        "Ours": (98.9, 94.7),
        "Ours*": (98.6, 95.7),
    },
    "transistor": {
        "SPADE": (94.1, 87.4),
        "PaDiM": (97.9, 91.4),
        "CFlow": (98.0, 81.4),
        "DRAEM": (90.9, 81.6),
        "UniAD": (97.9, 93.9),
        "Ours": (92.6, 89.7),
        "Ours*": (93.1, 90.1),
    },
    "wood": {
        "SPADE": (88.5, 87.4),
        "PaDiM": (95.7, 89.3),
        "CFlow": (96.7, 95.8),
        "DRAEM": (96.4, 94.6),
        "UniAD": (93.0, 86.0),
        "Ours": (94.7, 92.9),
        "Ours*": (94.5, 93.0),
    },
    "zipper": {
        "SPADE": (96.5, 92.6),
        "PaDiM": (98.5, 95.0),
        "CFlow": (99.0, 96.6),
        "DRAEM": (98.8, 96.3),
        "UniAD": (97.7, 93.2),
        "Ours": (97.6, 93.6),
        "Ours*": (97.6, 93.6),
    },
}

# The table's own "mean" row (method -> (pixel AUROC %, PRO %)).
MEAN: dict[str, tuple[float, float]] = {
    "SPADE": (96.0, 91.7),
    "PaDiM": (97.8, 92.8),
    "CFlow": (98.6, 94.6),
    "DRAEM": (97.3, 93.0),
    "UniAD": (97.0, 91.1),
    "Ours": (96.7, 93.7),
    "Ours*": (96.7, 94.1),
}

# Unified model (one model, all 15 classes): method -> (pixel AUROC %, PRO %).
UNIFIED: dict[str, tuple[float, float]] = {
    "Ours": (96.0, 93.0),
    "PaDiM": (90.5, 85.3),
    "DRAEM": (89.4, 82.2),
    "UniAD": (97.0, 91.1),
}

# Image AUROC of "Ours" at alpha = 0.5: only shown in a figure ("about 91").
OURS_IMAGE_AUROC_APPROX: float = 91.0

# The alpha sweep as stated in the text: alpha -> (pixel AUROC %, PRO %), approximate.
ALPHA_SWEEP: dict[float, tuple[float, float]] = {
    0.0: (96.7, 93.0),
    0.5: (96.7, 93.7),
    0.9: (94.4, 90.6),
}

# Other references on MVTec-AD: method -> (image AUROC %, pixel AUROC %, PRO %).
OTHER_REFERENCES: dict[str, tuple[float, float, float]] = {
    "PatchCore": (99.6, 98.2, 93.5),
    "DDAD": (99.8, 98.1, 92.3),
    "EfficientAD-M": (99.1, 96.9, 93.5),
}


def paper_row(category: str, method: str = "Ours") -> tuple[float, float] | None:
    """(pixel AUROC %, PRO %) the paper reports for an MVTec category (or "mean"); None if absent."""
    if category == "mean":
        return MEAN.get(method)
    return PER_CLASS.get(category, {}).get(method)
