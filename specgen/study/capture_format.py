"""The file of captured activations a sweep's `file:` regime reads (and `specgen capture` writes).

One file, `.safetensors` or a torch file (`.pt`, `.pth`), holds flat tensors:

    layers.<i>.q        [B, T, Hq, Dqk]   queries after RoPE (what the attention's softmax sees, before its scale)
    layers.<i>.k        [B, T, Hkv, Dqk]  keys after RoPE
    layers.<i>.v        [B, T, Hkv, Dv]   values
    layers.<i>.hidden   [B, T, D_model]   optional: the attention module's input (after the layer's input norm),
                                          what a DSA indexer is computed from
    needles             [N, 4] int64      optional: (b, probe t, kv group g, needle s) rows, for hit rates

plus metadata (safetensors' string metadata; a torch file's `meta` entry): `scale` (the model's softmax scale),
`model`, `layers`, `what`. A file without `layers.` keys is one layer: tensors named `q`, `k`, `v` (and `hidden`);
`[T, H, D]` tensors (`[T, D]` for hidden) are read as one sequence.

A regime names one layer with `file:PATH#layer=3`; `file:PATH` on a file of several layers is expanded by the sweep
into one regime per layer.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_LAYER = re.compile(r"^layers\.(\d+)\.(q|k|v|hidden)$")


class CaptureError(ValueError):
    """A captured-activations file that cannot be read as one (says which file and what to fix)."""


@dataclass
class Captured:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None
    needles: torch.Tensor | None
    meta: dict


def parse_regime(regime: str) -> tuple[str, int | None]:
    """"file:PATH#layer=3" -> ("PATH", 3); "file:PATH" -> ("PATH", None)."""
    body = regime[5:] if regime.startswith("file:") else regime
    path, sep, frag = body.partition("#")
    if not sep:
        return path, None
    m = re.fullmatch(r"layer=(\d+)", frag)
    if not m:
        raise CaptureError(f"{regime}: after '#' write layer=N (e.g. file:{path}#layer=0)")
    return path, int(m.group(1))


def resolve(path: str | Path, base_dir: Path | None = None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise CaptureError(f"{path}: no such capture file (write one with `specgen capture`, docs/sweeps.md)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        meta = {}
        for key, value in raw.items():
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                meta[key] = value
        return tensors, meta
    if path.suffix not in TORCH_SUFFIXES:
        raise CaptureError(f"{path}: unknown capture format {path.suffix!r}; use .safetensors or .pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise CaptureError(f"{path}: a torch capture is a dict of tensors (torch.save({{'q': q, 'k': k, 'v': v}}))")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, meta


def layers_of(path: str | Path, base_dir: Path | None = None) -> list[int] | None:
    """The layers a file holds (sorted), or None for a single-layer file (plain q, k, v)."""
    p = resolve(path, base_dir)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:          # the names only: no tensor is read
            names = list(f.keys())
    else:
        names = list(_read(p)[0])
    found = sorted({int(m.group(1)) for name in names if (m := _LAYER.match(name))})
    return found or None


def content_hash(path: str | Path, base_dir: Path | None = None) -> str:
    """sha256 of the file's bytes (first 16 hex digits): a changed capture is a new measurement."""
    h = hashlib.sha256()
    with resolve(path, base_dir).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load(path: str | Path, layer: int | None = None, base_dir: Path | None = None) -> Captured:
    """One layer's q, k, v (and hidden, needles, metadata) as [B, T, H, D] tensors."""
    p = resolve(path, base_dir)
    tensors, meta = _read(p)
    layers = sorted({int(m.group(1)) for name in tensors if (m := _LAYER.match(name))})
    if layers:
        if layer is None:
            if len(layers) > 1:
                raise CaptureError(f"{p}: holds layers {layers}; name one with file:{path}#layer=N")
            layer = layers[0]
        if layer not in layers:
            raise CaptureError(f"{p}: has no layer {layer} (it holds layers {layers})")
        prefix = f"layers.{layer}."
    else:
        if layer is not None:
            raise CaptureError(f"{p}: a single-layer file (tensors q, k, v): drop '#layer={layer}'")
        prefix = ""
    missing = [n for n in ("q", "k", "v") if prefix + n not in tensors]
    if missing:
        raise CaptureError(f"{p}: needs tensors named {', '.join(prefix + n for n in ('q', 'k', 'v'))}; "
                           f"missing {', '.join(prefix + n for n in missing)}")
    q, k, v = (tensors[prefix + n] if tensors[prefix + n].dim() == 4 else tensors[prefix + n][None]
               for n in ("q", "k", "v"))
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise CaptureError(f"{p}: q, k, v must be [B, T, H, D] (or [T, H, D]); got {list(q.shape)}, "
                           f"{list(k.shape)}, {list(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise CaptureError(f"{p}: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not agree on "
                           f"[B, T, Hkv] and Dqk")
    hidden = tensors.get(prefix + "hidden")
    if hidden is not None:
        hidden = hidden if hidden.dim() == 3 else hidden[None]
        if hidden.shape[:2] != q.shape[:2]:
            raise CaptureError(f"{p}: hidden {list(hidden.shape)} does not match q's [B, T] {list(q.shape[:2])}")
    needles = tensors.get("needles")
    return Captured(q, k, v, hidden, None if needles is None else needles.to(torch.int64), meta)


def save(path: str | Path, layers: dict[int, dict[str, torch.Tensor]], meta: dict | None = None) -> Path:
    """Write captured layers ({layer: {"q": .., "k": .., "v": .., "hidden": ..}}) in the format above; the suffix
    picks safetensors or torch."""
    p = Path(path)
    flat = {f"layers.{i}.{name}": t.detach().contiguous().cpu() for i, d in layers.items() for name, t in d.items()}
    meta = {"layers": sorted(layers), **(meta or {})}
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(flat, str(p), metadata={k: json.dumps(v) for k, v in meta.items()})
    elif p.suffix in TORCH_SUFFIXES:
        torch.save({**flat, "meta": meta}, p)
    else:
        raise CaptureError(f"--out {p}: name a .safetensors or .pt file")
    return p


__all__ = ["CaptureError", "Captured", "content_hash", "layers_of", "load", "parse_regime", "resolve", "save"]
