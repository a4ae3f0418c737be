"""OpenAI's ImageNet ADM checkpoint as the UNet's starting point (METHOD.md §2, "fine-tunes").

The official train.sh fine-tunes from OpenAI's class-conditional 256x256 ADM
(``--resume_checkpoint ./256x256_diffusion.pt``): it pops ``label_emb.weight`` (1000 ImageNet
classes) and loads the rest with ``strict=False``, so the label embedding and the feature head
keep their fresh initialisation while every other tensor must fit (PyTorch still refuses shape
mismatches). Here:

* ``prepare_init_checkpoint(cfg)`` resolves ``train.init_checkpoint``: a named source
  (``"openai-adm-256"``: fetched with the project's resumable downloader into
  ``$DIFFAD_HOME/weights/``, its sha256 recorded in a sidecar json since OpenAI publishes none)
  or a local file; ``train.init_sha256`` pins the hash, ``train.init_offline`` never downloads.
* ``load_adm_init(unet, path_or_state_dict, num_classes=...)`` copies every tensor by name and
  shape, re-initialises nothing but the label embedding and the feature head (both kept as
  built), and refuses any other missing, unexpected or mis-shaped key: no partial load.

Our UNet's parameter names follow OpenAI's layout (``time_embed``, ``input_blocks.N``,
``middle_block``, ``output_blocks.N``, ``out``), so no renaming is needed beyond a ``module.``
prefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffad_core._atomic import atomic_write_text
from diffad_core.config import DiffadConfig, TrainConfig, diffad_home
from diffad_core.data.download import DownloadError, download_file
from diffad_core.nets.backbones import file_sha256

__all__ = ["ADM_SOURCES", "AdmInitError", "AdmSource", "InitPlan", "InitReport", "InitWeights",
           "check_adm_state_dict", "load_adm_init", "prepare_init_checkpoint",
           "read_adm_state_dict"]

# Kept at their fresh initialisation: the label embedding is re-made for our classes, and the
# feature head is not in OpenAI's file (METHOD.md §2).
_FRESH_PREFIXES = ("label_emb.", "feature_head.")
_DROPPED_PREFIXES = ("label_emb.",)  # in the file, never loaded
_GROUPS = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out",
           "feature_head")
_SHOW = 5  # mismatches named per kind in an error


class AdmInitError(RuntimeError):
    """An init checkpoint that cannot be fetched, verified, read, or loaded as a whole."""


@dataclass(frozen=True)
class AdmSource:
    """A named init checkpoint: the file name under ``$DIFFAD_HOME/weights`` and its URLs."""

    filename: str
    urls: tuple[str, ...]
    description: str


ADM_SOURCES: dict[str, AdmSource] = {
    "openai-adm-256": AdmSource(
        filename="256x256_diffusion.pt",
        urls=("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt",),
        description="OpenAI guided-diffusion ImageNet 256x256 class-conditional ADM (about 2.1 GB)",
    ),
}


@dataclass(frozen=True)
class InitWeights:
    """A resolved init checkpoint: where it is, its sha256, and whether this call fetched it."""

    path: Path
    sha256: str
    source: str  # a key of ADM_SOURCES, or "file" for a local path
    downloaded: bool
    urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "urls": list(self.urls)}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 in the sidecar json, if it still describes this file (same size and mtime)."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        st = path.stat()
        if meta["size_bytes"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns:
            return str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _record_sha256(path: Path, sha: str, source: str, urls: tuple[str, ...]) -> None:
    st = path.stat()
    meta = {"source": source, "urls": list(urls), "sha256": sha, "size_bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(_sidecar(path), json.dumps(meta, indent=2) + "\n")


def _check_pin(path: Path, sha: str, pinned: str | None) -> None:
    if pinned is not None and sha != pinned:
        raise AdmInitError(
            f"init checkpoint {path}: sha256 {sha} does not match train.init_sha256 {pinned} "
            "(delete the file to fetch it again, or fix the pin)"
        )


def prepare_init_checkpoint(cfg: DiffadConfig | TrainConfig, progress: bool = True
                            ) -> InitWeights | None:
    """Resolve ``train.init_checkpoint`` to a verified local file (None when it is null).

    A named source is taken from ``$DIFFAD_HOME/weights/<filename>`` when present, else fetched
    there (resumable; never with ``train.init_offline``). Its sha256 is computed once and kept
    in ``<filename>.json`` beside it; a pinned ``train.init_sha256`` that differs is an error
    naming the file and both hashes. Any other value must be an existing local file.
    """
    train = cfg.train if isinstance(cfg, DiffadConfig) else cfg
    spec = train.init_checkpoint
    if spec is None:
        return None
    pinned = train.init_sha256.strip().lower() if train.init_sha256 else None
    source = ADM_SOURCES.get(spec)
    if source is None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise AdmInitError(
                f"train.init_checkpoint {spec!r} is neither a named source "
                f"({', '.join(ADM_SOURCES)}) nor an existing file"
            )
        sha = file_sha256(path)
        _check_pin(path, sha, pinned)
        return InitWeights(path, sha, "file", False)

    dest = diffad_home() / "weights" / source.filename
    urls = tuple(train.init_urls or source.urls)
    downloaded = False
    if not dest.is_file():
        if train.init_offline:
            raise AdmInitError(
                f"train.init_offline is set and {dest} does not exist: put {source.filename} "
                f"there (from {urls[0] if urls else 'its source'}) or set train.init_checkpoint "
                "to a local file"
            )
        try:
            download_file(urls, dest, pinned, progress=progress)
        except DownloadError as exc:
            raise AdmInitError(f"init checkpoint {spec!r} into {dest}: {exc}") from exc
        downloaded = True
    sha = _recorded_sha256(dest)
    if sha is None:
        sha = file_sha256(dest)
        _record_sha256(dest, sha, spec, urls)
    _check_pin(dest, sha, pinned)
    return InitWeights(dest, sha, spec, downloaded, urls)


def read_adm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (torch or safetensors), ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise AdmInitError(f"init checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            try:  # memory-mapped: the 2.1 GB file is not read into memory at once
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
        raise AdmInitError(f"init checkpoint {path} is not a readable state_dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdmInitError(f"init checkpoint {path} does not hold a state_dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


@dataclass(frozen=True)
class InitPlan:
    loaded: list[str]
    fresh: list[str]
    dropped: list[str]


def check_adm_state_dict(own: Mapping[str, tuple[int, ...]],
                         file: Mapping[str, tuple[int, ...]], source: str = "<state_dict>") -> InitPlan:
    """Match a checkpoint's (name -> shape) against the UNet's, or raise ``AdmInitError``.

    Works on shapes only, so it can check the full-size model on the meta device.
    """
    own = {k: tuple(v) for k, v in own.items()}
    file = {k: tuple(v) for k, v in file.items()}
    missing = sorted(k for k in own if k not in file and not k.startswith(_FRESH_PREFIXES))
    # A file with a feature head is not OpenAI's: say so rather than discard the head silently.
    unexpected = sorted(k for k in file if not k.startswith(_DROPPED_PREFIXES)
                        and (k not in own or k.startswith(_FRESH_PREFIXES)))
    mismatched = sorted(k for k in own if k in file and not k.startswith(_FRESH_PREFIXES)
                        and own[k] != file[k])
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (in the UNet, not in the file): "
                         + ", ".join(missing[:_SHOW]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (in the file, not in the UNet): "
                         + ", ".join(unexpected[:_SHOW]))
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): " + ", ".join(
                f"{k} file {file[k]} vs model {own[k]}" for k in mismatched[:_SHOW]))
        raise AdmInitError(f"init checkpoint {source} does not fit the UNet (nothing loaded): "
                           + "; ".join(parts))
    fresh = sorted(k for k in own if k.startswith(_FRESH_PREFIXES))
    loaded = [k for k in own if k not in set(fresh)]
    dropped = sorted(k for k in file if k.startswith(_DROPPED_PREFIXES))
    return InitPlan(loaded, fresh, dropped)


@dataclass(frozen=True)
class InitReport:
    """What ``load_adm_init`` did: counts, one row per parameter group, lines for the log."""

    source: str
    tensors_loaded: int
    parameters_loaded: int
    tensors_fresh: int
    parameters_fresh: int
    fresh: list[str]  # our keys kept at their fresh initialisation
    dropped: list[str]  # file keys not used (the file's label embedding)
    rows: list[dict[str, Any]] = field(default_factory=list)  # group, status, tensors, parameters
    lines: list[str] = field(default_factory=list)

    def table_markdown(self) -> str:
        out = ["| group | status | tensors | parameters |", "|---|---|---|---|"]
        out += [f"| {r['group']} | {r['status']} | {r['tensors']} | {r['parameters']:,} |"
                for r in self.rows]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _group(key: str) -> str:
    head = key.split(".", 1)[0]
    return head if head in _GROUPS else "other"


def _rows(own: Mapping[str, tuple[int, ...]], plan: InitPlan,
          file: Mapping[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], list[int]] = {}

    def add(key: str, status: str, shape: tuple[int, ...]) -> None:
        c = counts.setdefault((_group(key), status), [0, 0])
        c[0] += 1
        c[1] += int(torch.Size(shape).numel())

    for k in plan.loaded:
        add(k, "loaded", own[k])
    for k in plan.fresh:
        add(k, "re-initialised", own[k])
    for k in plan.dropped:
        add(k, "dropped (file only)", file[k])
    order = {g: i for i, g in enumerate((*_GROUPS, "other"))}
    return [{"group": g, "status": s, "tensors": n, "parameters": p}
            for (g, s), (n, p) in sorted(counts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))]


def load_adm_init(unet: nn.Module, state_dict_or_path: Mapping[str, torch.Tensor] | str | Path,
                  *, num_classes: int | None) -> InitReport:
    """Initialise ``unet`` from an OpenAI ADM state_dict (or file), all or nothing.

    ``num_classes``: the classes the UNet is conditioned on (None: unconditional); it must agree
    with the UNet's label embedding, which keeps its fresh init (nn.Embedding's N(0, 1), as in
    the official run), like the feature head. Every other tensor is copied by name and shape;
    otherwise ``AdmInitError`` names the first mismatches and the UNet is left untouched.
    """
    label_emb = getattr(unet, "label_emb", None)
    have = int(label_emb.num_embeddings) if isinstance(label_emb, nn.Embedding) else None
    if have != num_classes:
        raise ValueError(f"load_adm_init: num_classes={num_classes} but the UNet's label "
                         f"embedding has {have if have is not None else 'no'} classes")
    if isinstance(state_dict_or_path, (str, Path)):
        source = str(state_dict_or_path)
        src = read_adm_state_dict(state_dict_or_path)
    else:
        source = "<state_dict>"
        src = {str(k).removeprefix("module."): v for k, v in state_dict_or_path.items()}
    own_tensors = unet.state_dict()
    own = {k: tuple(v.shape) for k, v in own_tensors.items()}
    file = {k: tuple(v.shape) for k, v in src.items()}
    plan = check_adm_state_dict(own, file, source)
    with torch.no_grad():
        for key in plan.loaded:
            own_tensors[key].copy_(src[key])  # state_dict tensors share storage with the module
    n_loaded = sum(int(torch.Size(own[k]).numel()) for k in plan.loaded)
    n_fresh = sum(int(torch.Size(own[k]).numel()) for k in plan.fresh)
    file_classes = file.get("label_emb.weight", (None,))[0]
    lines = [f"initialised {len(plan.loaded)}/{len(own)} tensors ({n_loaded:,} parameters) "
             f"from {source}"]
    if num_classes is not None:
        lines.append(f"label_emb.weight re-initialised for {num_classes} classes"
                     + (f" (the file's {file_classes} classes dropped)" if file_classes else ""))
    elif plan.dropped:
        lines.append(f"dropped from the file (unconditional UNet): {', '.join(plan.dropped)}")
    head = [k for k in plan.fresh if k.startswith("feature_head.")]
    if head:
        lines.append(f"feature head re-initialised (not in the file): {len(head)} tensors")
    return InitReport(source, len(plan.loaded), n_loaded, len(plan.fresh), n_fresh, plan.fresh,
                      plan.dropped, _rows(own, plan, file), lines)
