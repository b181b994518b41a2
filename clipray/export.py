"""Export a trained retrieval model as weights + a JSON recipe, and load it back, no pickle.

    out_dir/model.safetensors   every tensor of `model.state_dict()`, in the model's dtype
    out_dir/config.json         format tag, registry name, head / linear_patch / tuning, the
                                open_clip model name and its full config dict, tokenizer name,
                                image size, dtype, and the caller's `extra` (e.g. metrics)

`load_export(dir)` rebuilds the towers from the stored open_clip config (no registry lookup of
weights, no download; the original `pretrained` value is kept for provenance only), loads the
safetensors strictly and returns a model that is bit-identical to the one saved. Only
safetensors and JSON are read; a directory that holds only pickle files (.pt/.bin/.pth/.pkl)
is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from clipray.config import ConfigError

FORMAT = "clipray.export/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _unwrap(model):
    """Accept the model, a RetrievalTask or a DeepSpeed engine around either."""
    while not hasattr(model, "build_info"):
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} is not a clipray retrieval model")
        model = inner
    return model


def save_export(model, out_dir: str | Path, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write `model.safetensors` + `config.json` into `out_dir` (created); returns the dir."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    info = model.build_info
    config = {
        "format": FORMAT,
        "name": info["name"],
        "overrides": {k: info[k] for k in ("pretrained", "head", "linear_patch", "tuning")},
        "open_clip_name": info["open_clip_name"],
        "open_clip_cfg": info["open_clip_cfg"],
        "tokenizer_name": info["tokenizer_name"],
        "image_size": model.image_size,
        "pixel_stats": model.backbone.pixel_stats(),
        "context_length": model.context_length,
        "indexable": model.indexable,
        "dtype": dtypes.pop() if len(dtypes) == 1 else "float32",
        "extra": extra or {},
    }
    text = json.dumps(config, indent=2, sort_keys=True)  # fails early on non-JSON `extra`
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CONFIG).write_text(text)
    return out


def read_export_config(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: not a clipray export, no {CONFIG} in it "
                                f"(a training run writes its export to RUN_DIR/export)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not a clipray export, not valid JSON ({e})") from e
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise ConfigError(f"{path}: not a clipray export, format {found!r} where {FORMAT!r} was expected")
    return config


def local_dir(export_dir: str) -> str | None:
    """The export's directory on this machine (a path or a file:// URI), or None when it is at
    a remote URI (s3://..., where a run directory in object storage keeps it)."""
    if "://" not in export_dir or export_dir.startswith("file://"):
        return export_dir.removeprefix("file://")
    return None


def fetch_export(export_dir: str, into: str | Path) -> str:
    """A local directory holding the export: a local one as it is; one at a remote URI copied
    into `into` first."""
    local = local_dir(export_dir)
    if local is not None:
        return local
    import fsspec

    fs, root = fsspec.core.url_to_fs(export_dir)
    Path(into).mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        fs.get_file(f"{root.rstrip('/')}/{name}", str(Path(into) / name))
    return str(into)


def load_export(export_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the exported model on `device` with its saved weights and dtype (eval mode)."""
    import dataclasses

    from safetensors.torch import load_file

    from clipray.models import ModelSpec, build_from_spec

    root = Path(export_dir)
    weights = root / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in root.glob("*") if p.suffix in _PICKLE_SUFFIXES)
        hint = f"; found only pickle files {pickles}, which are never loaded" if pickles else ""
        raise FileNotFoundError(f"{weights} missing{hint}")
    config = read_export_config(root)
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    spec = ModelSpec(
        open_clip_name=config["open_clip_name"],
        tokenizer_name=config["tokenizer_name"],
        **{k: v for k, v in config["overrides"].items() if k in fields},
    )
    model = build_from_spec(config["name"], spec, open_clip_cfg=config["open_clip_cfg"])
    model.backbone.set_pixel_stats(**config["pixel_stats"])
    model.to(dtype=getattr(torch, config["dtype"]))
    from safetensors import SafetensorError

    try:  # cut off in a copy or an upload: say which file, not only safetensors' header error
        state = load_file(str(weights), device="cpu")
    except SafetensorError as e:
        raise ConfigError(f"{weights}: not a readable safetensors file ({e}): export the model again") from None
    want = model.state_dict()
    diff = ([f"missing {k}" for k in want if k not in state] + [f"unexpected {k}" for k in state if k not in want]
            + [f"{k} is {list(state[k].shape)}, not {list(v.shape)}" for k, v in want.items()
               if k in state and state[k].shape != v.shape])
    if diff:  # weights of another model next to this config.json (a half-overwritten export)
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(f"{weights} does not hold the model its {CONFIG} describes "
                          f"({config['overrides']['head']} head): {', '.join(diff[:3])}{more}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
