"""Model registry: a name -> a CLIP4Clip build recipe, with a tiny `test_*` twin per head.

    create_model("clip4clip_vitb32_seqTransf", pretrained="openai")    # paper setting
    create_model("clip4clip_vitb32_meanP", pretrained="/ckpt/ViT-B-32.pt", linear_patch="3d")
    create_model("test_meanP")                                         # tiny, random, for tests

Overrides (None = the registered default): `pretrained` (open_clip tag or local checkpoint file;
the default is None = random init, so nothing is ever downloaded unless asked for; the paper's
weights are `pretrained="openai"`), `head` (meanP | seqLSTM | seqTransf | tightTransf),
`linear_patch` (2d | 3d), `tuning` (full | frozen | unipt).

Real names use the `-quickgelu` open_clip configs: OpenAI's CLIP was trained with QuickGELU and
CLIP4Clip copies those text blocks. The tiny towers (`clipray-tiny`: 32 px, 2 vision layers,
4 text layers, width 64, 49408-token vocabulary) use the stock BPE tokenizer, so their
`tokenizer_name` is "ViT-B-32", which any process can load without registering our config.
Importing this package loads neither torch nor open_clip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from clipray.config import ModelConfig
    from clipray.models.clip4clip import CLIP4Clip

HEAD_NAMES = ("meanP", "seqLSTM", "seqTransf", "tightTransf")


@dataclass(frozen=True)
class ModelSpec:
    open_clip_name: str
    tokenizer_name: str
    head: str = "meanP"
    linear_patch: str = "2d"
    tuning: str = "full"
    pretrained: Optional[str] = None


_REGISTRY: dict[str, ModelSpec] = {}

_FAMILIES = {  # the paper trains the ViT-B families from OpenAI's weights: pretrained="openai"
    "clip4clip_vitb32": ModelSpec("ViT-B-32-quickgelu", "ViT-B-32-quickgelu"),
    "clip4clip_vitb16": ModelSpec("ViT-B-16-quickgelu", "ViT-B-16-quickgelu"),
    "test": ModelSpec("clipray-tiny", "ViT-B-32"),
}


def register_model(name: str, spec: ModelSpec) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = spec


for _family, _base in _FAMILIES.items():
    for _head in HEAD_NAMES:
        register_model(f"{_family}_{_head}", dataclasses.replace(_base, head=_head))


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def _no_weights(value: Optional[str]) -> bool:
    return value is None or str(value).strip().lower() in ("", "none", "null", "random")


def create_model(
    name: str,
    *,
    pretrained: Optional[str] = None,
    head: Optional[str] = None,
    linear_patch: Optional[str] = None,
    tuning: Optional[str] = None,
) -> "CLIP4Clip":
    """Build registered model `name`; each override left None keeps the registered value."""
    spec = get_spec(name)
    if pretrained is None:  # keep the registered weights; "none"/"random" asks for none
        pretrained = spec.pretrained
    spec = dataclasses.replace(
        spec,
        pretrained=None if _no_weights(pretrained) else pretrained,
        head=head or spec.head,
        linear_patch=linear_patch or spec.linear_patch,
        tuning=tuning or spec.tuning,
    )
    check_options(spec.linear_patch, spec.tuning)
    return build_from_spec(name, spec)


def check_options(linear_patch: str, tuning: str) -> None:
    """Refuse options that cannot work together (ValueError saying why).

    The 3d patch is a new Conv3d in front of the image tower that starts as the 2d patch and
    only differs once trained; a tuning that runs the tower without autograd (frozen, unipt)
    never trains it, so the model would be the 2d one at the cost of a Conv3d."""
    from clipray.models.tuning import TUNINGS

    cls = TUNINGS.get(tuning)
    if linear_patch == "3d" and cls is not None and not cls.trains_backbone:
        raise ValueError(f"linear_patch '3d' needs tuning 'full': tuning {tuning!r} runs CLIP's image "
                         "tower without autograd, so the 3d patch would never train and stay the 2d one")


def check_frames(head: str, context_length: int, max_frames: int) -> None:
    """ValueError unless `head` takes `max_frames` frames: the temporal transformers take one
    position per frame from CLIP's text positions (tightTransf one more, for the caption); more
    frames fail at the first batch, in every worker or actor."""
    extra = {"seqTransf": 0, "tightTransf": 1}.get(head)
    if extra is not None and max_frames + extra > context_length:
        raise ValueError(f"the {head} head has {context_length} positions"
                         f"{' (one for the caption)' if extra else ''}, so at most {context_length - extra} frames")


def check_pretrained(name: str, pretrained: Optional[str] = None) -> None:
    """ValueError unless `create_model(name, pretrained=pretrained)` can load its weights: open_clip
    takes a tag it knows for the model or a local file, nothing else (no URI, no tag of another
    model). None = the registered weights, as in `create_model`. Nothing is downloaded."""
    import os

    import open_clip

    from clipray.models.backbone import register_tiny_configs

    spec = get_spec(name)
    if pretrained is None:
        pretrained = spec.pretrained
    if _no_weights(pretrained):
        return
    register_tiny_configs()
    if os.path.isfile(pretrained) and _export_weights(pretrained):
        # open_clip would fail on its keys (backbone.clip.*) in every worker, once Ray is up
        raise ValueError("the weights of a clipray export (a training run's export/), not an open_clip "
                         "checkpoint; a run goes on from its own checkpoints when re-run with the same "
                         "train.run_name and train.storage_path")
    if os.path.isfile(pretrained):
        _check_weights_file(spec.open_clip_name, pretrained)
        return
    if open_clip.get_pretrained_cfg(spec.open_clip_name, pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(spec.open_clip_name)
    raise ValueError(f"not a pretrained tag of {spec.open_clip_name} ("
                     f"{'its tags: ' + ', '.join(tags) if tags else 'it has none'}) nor a local checkpoint file")


def _check_weights_file(name: str, path: str) -> None:
    """ValueError unless open_clip loads the file into the model `name`: the same
    `open_clip.load_checkpoint` each training worker runs, into a model on the meta device (no
    memory for its weights, nothing initialised). A file that is no checkpoint, or one of another
    model, failed in every training worker once Ray was up."""
    import warnings

    import open_clip
    import torch

    from clipray.models.backbone import open_clip_config

    cfg = dict(open_clip_config(name))
    if cfg.pop("custom_text", False):  # not an open_clip.CLIP: load_open_clip refuses the model itself
        return
    with torch.device("meta"):
        clip = open_clip.CLIP(**cfg, nonscalar_logit_scale=True)
    try:
        with warnings.catch_warnings():  # copying into a meta tensor does nothing, said once per tensor
            warnings.simplefilter("ignore")
            open_clip.load_checkpoint(clip, path)
    except Exception as e:  # pickle's KeyError, a missing key's RuntimeError, open_clip's AssertionError
        why = " ".join(str(e).split())
        raise ValueError(f"open_clip cannot load this file as the weights of {name} ({type(e).__name__}"
                         + (f": {why[:300]}" if why else "") + ")") from None


def _export_weights(path: str) -> bool:
    """Whether a file is an export's model.safetensors (`clipray.export`), read from its header."""
    from clipray.export import FORMAT

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors (an open_clip .pt, .bin): open_clip's to load
        return False


def build_model(cfg: "ModelConfig") -> "CLIP4Clip":
    """Build from the `model:` section of a clipray config."""
    return create_model(
        cfg.name, pretrained=cfg.pretrained, head=cfg.head, linear_patch=cfg.linear_patch, tuning=cfg.tuning
    )


def build_from_spec(name: str, spec: ModelSpec, open_clip_cfg: Optional[dict[str, Any]] = None) -> "CLIP4Clip":
    """Assemble backbone + head + tuning. With `open_clip_cfg` the towers are built from that
    config (random weights, to be overwritten, e.g. by `clipray.export.load_export`)."""
    from clipray.models.backbone import ClipBackbone, load_open_clip, open_clip_config
    from clipray.models.clip4clip import CLIP4Clip
    from clipray.models.heads import build_head
    from clipray.models.tuning import build_tuning

    if spec.head not in HEAD_NAMES:
        raise ValueError(f"unknown head {spec.head!r}; choose one of {list(HEAD_NAMES)}")
    cfg = open_clip_cfg if open_clip_cfg is not None else open_clip_config(spec.open_clip_name)
    clip = load_open_clip(
        spec.open_clip_name,
        pretrained=None if open_clip_cfg is not None else spec.pretrained,
        cfg=open_clip_cfg,
    )
    backbone = ClipBackbone(clip, linear_patch=spec.linear_patch)
    info = dict(dataclasses.asdict(spec), name=name, open_clip_cfg=cfg)
    return CLIP4Clip(backbone, build_head(spec.head, clip), build_tuning(spec.tuning), info)


__all__ = [
    "HEAD_NAMES", "ModelSpec", "build_from_spec", "build_model", "check_options", "check_pretrained",
    "create_model", "get_spec", "list_models", "register_model",
]
