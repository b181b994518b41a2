"""Export a trained retrieval model as weights + a JSON recipe, and load it back, no pickle.

    out_dir/model.safetensors   every tensor of `model.state_dict()`, in the model's dtype
    out_dir/config.json         format tag, registry name, head / linear_patch / tuning, the
                                open_clip model name and its full config dict, tokenizer name,
                                image size, dtype, the caller's `extra` (e.g. metrics) and
                                the weights file's signature (size, hash of its ends)

`load_export(dir)` rebuilds the towers from the stored open_clip config (no registry lookup of
weights, no download; the original `pretrained` value is kept for provenance only), loads the
safetensors strictly and returns a model that is bit-identical to the one saved. Only
safetensors and JSON are read; a directory that holds only pickle files (.pt/.bin/.pth/.pkl)
is refused. `check_export(dir)` refuses what `load_export` would (weights cut off, of another
model, or of another export than config.json's) from the safetensors header and ends, so a
job can check before it starts workers.
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
# what loading and serving read from config.json ("extra" is optional)
DTYPES = ("float32", "bfloat16", "float16", "float64")  # as save_export records them (torch names)
REQUIRED = ("name", "overrides", "open_clip_name", "open_clip_cfg", "tokenizer_name", "image_size",
            "pixel_stats", "context_length", "indexable", "dtype")
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
    json.dumps(config, sort_keys=True)  # fails early on non-JSON `extra`
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    config["weights_signature"] = _signature(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def _signature(weights: Path) -> list:
    """The weights file's size and a hash of its ends (clipray.manifest.file_signature), which
    config.json records: the same tensors saved again give the same, other weights another."""
    import pyarrow.fs as pafs

    from clipray.manifest import file_signature

    return file_signature(pafs.LocalFileSystem(), str(weights.absolute()))


def _check_pair(weights: Path, config: dict) -> None:
    """An export's two files are copied one at a time (a run's export over the last call's, a
    fetch, an upload): a copy stopped between them left new weights beside the old config.json
    (or the other way round), of the same model, which loaded without a word with another
    export's recorded sampling, caption length and metrics. Exports from before the record pass."""
    recorded = config.get("weights_signature")
    if recorded is not None and _signature(weights) != recorded:
        raise ConfigError(f"{weights} and its {CONFIG} are of two different exports (a copy of one over the "
                          "other stopped between its files): copy or export the model again")


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
    missing = [k for k in REQUIRED if k not in config]
    if missing:  # a hand-edited or cut file: else a KeyError where the key is first read
        raise ConfigError(f"{path}: {', '.join(missing)} missing; export the model again")
    # what load_export reads of them, checked here as check_export promises: "fp16" or a null
    # pixel_stats passed every check before a job started, then failed in each of its actors
    # a null open_clip_cfg built the registry's model with its `pretrained` tag: weights fetched
    # from the hub, then a NotImplementedError (meta tensors); overrides without a head a KeyError
    for key, kind in (("open_clip_cfg", "a mapping"), ("overrides", "a mapping with a 'head'")):
        if not isinstance(config[key], dict) or (key == "overrides" and "head" not in config[key]):
            raise ConfigError(f"{path}: {key} {config[key]!r} is not {kind}; export the model again")
    if config["dtype"] not in DTYPES:
        raise ConfigError(f"{path}: dtype {config['dtype']!r} is none of {', '.join(DTYPES)}; export the model again")
    stats = config["pixel_stats"]
    if not (isinstance(stats, dict) and set(stats) == {"mean", "std"}
            and all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                    for v in stats.values())):
        raise ConfigError(f"{path}: pixel_stats {stats!r} is not {{'mean': [3 numbers], 'std': [3 numbers]}}; "
                          "export the model again")
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
    from clipray.manifest import fsspec_path

    fs, root = fsspec_path(export_dir)
    Path(into).mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        fs.get_file(f"{root.rstrip('/')}/{name}", str(Path(into) / name))
    return str(into)


def _fetched_weights(cfg: Any) -> list[str]:
    """Options of an open_clip config that make building it fetch pretrained tower weights
    (timm's or a Hugging Face text model's, from the hub), which an export never needs."""
    vision = cfg.get("vision_cfg") if isinstance(cfg, dict) else None
    text = cfg.get("text_cfg") if isinstance(cfg, dict) else None
    asks = []
    if isinstance(vision, dict) and vision.get("timm_model_name") and vision.get("timm_model_pretrained"):
        asks.append("vision_cfg.timm_model_pretrained")
    if isinstance(text, dict) and text.get("hf_model_name") and text.get("hf_model_pretrained", True):
        asks.append("text_cfg.hf_model_pretrained")
    return asks


def _build(config: dict[str, Any], root: Path):
    import dataclasses

    from clipray.models import ModelSpec, build_from_spec

    asks = _fetched_weights(config["open_clip_cfg"])
    if asks:  # building it would download weights from the hub (named by this file) before loading ours
        raise ConfigError(f"{root / CONFIG}: open_clip_cfg asks for pretrained tower weights ({', '.join(asks)}), "
                          f"which open_clip would fetch from the network; an export's weights are its {WEIGHTS} only")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    try:  # a hand-edited config.json ("head": "meanp", overrides as a list): a traceback, and in every actor
        spec = ModelSpec(
            open_clip_name=config["open_clip_name"],
            tokenizer_name=config["tokenizer_name"],
            **{k: v for k, v in config["overrides"].items() if k in fields},
        )
        return build_from_spec(config["name"], spec, open_clip_cfg=config["open_clip_cfg"])
    # NotImplementedError: what clipray itself refuses to build (an HF text tower's custom_text,
    # a 3d patch or UniPT on a tower that is no ViT), which `clipray index` printed as a traceback
    except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError) as e:
        raise ConfigError(f"{root / CONFIG}: describes no model clipray can build ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); export the model again") from None


def _weights_of(root: Path) -> Path:
    weights = root / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in root.glob("*") if p.suffix in _PICKLE_SUFFIXES)
        hint = f"; found only pickle files {pickles}, which are never loaded" if pickles else ""
        raise FileNotFoundError(f"{weights} missing{hint}")
    return weights


def _unreadable(weights: Path, e: Exception) -> ConfigError:
    # cut off in a copy or an upload: say which file, not only safetensors' header error
    return ConfigError(f"{weights}: not a readable safetensors file ({e}): export the model again")


def _check_shapes(weights: Path, config: dict, want: dict[str, tuple], have: dict[str, tuple]) -> None:
    diff = ([f"missing {k}" for k in want if k not in have] + [f"unexpected {k}" for k in have if k not in want]
            + [f"{k} is {list(have[k])}, not {list(v)}" for k, v in want.items() if k in have and have[k] != v])
    if diff:  # weights of another model next to this config.json (a half-overwritten export)
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(f"{weights} does not hold the model its {CONFIG} describes "
                          f"({config['overrides']['head']} head): {', '.join(diff[:3])}{more}")


def check_export(export_dir: str | Path) -> dict[str, Any]:
    """The export's config, once its weights file is known to hold the model it describes: the
    safetensors header (names and shapes) against the model built on the meta device, so no
    weight is read or allocated. What `load_export` would refuse, in a fraction of a second:
    a job checks its exports with it before it starts the workers that load them."""
    from safetensors import SafetensorError, safe_open

    root = Path(export_dir)
    config = read_export_config(root)  # a run folder, not its export: says so
    weights = _weights_of(root)
    try:
        with safe_open(str(weights), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise _unreadable(weights, e) from None
    with torch.device("meta"):
        model = _build(config, root)
    _check_shapes(weights, config, {k: tuple(v.shape) for k, v in model.state_dict().items()}, have)
    _check_pair(weights, config)
    return config


def load_export(export_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the exported model on `device` with its saved weights and dtype (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(export_dir)
    config = read_export_config(root)  # first, as check_export: a run folder, not its export, says so
    weights = _weights_of(root)
    model = _build(config, root)
    model.backbone.set_pixel_stats(**config["pixel_stats"])
    model.to(dtype=getattr(torch, config["dtype"]))
    try:
        state = load_file(str(weights), device="cpu")
    except SafetensorError as e:
        raise _unreadable(weights, e) from None
    want = model.state_dict()
    _check_shapes(weights, config, {k: tuple(v.shape) for k, v in want.items()},
                  {k: tuple(v.shape) for k, v in state.items()})
    _check_pair(weights, config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
