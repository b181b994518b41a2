"""Export: safetensors + JSON recipe, reloaded bit-identical, offline, never from pickle."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from clipray.export import check_export, load_export, save_export
from clipray.models import create_model
from clipray.task import RetrievalTask


def _inputs():
    g = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    tokens = torch.zeros(2, 8, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, torch.tensor([320, 1929, 2368]), 49407
    return frames, mask, tokens


def _outputs(model):
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        feats = model.encode_frames(model.normalize(frames), mask)
        return model.encode_text(tokens), feats, model.similarity(model.encode_text(tokens), feats, mask)


@pytest.mark.parametrize(
    "name,overrides",
    [("test_seqTransf", {"linear_patch": "3d"}), ("test_seqTransf", {"tuning": "frozen"}), ("test_tightTransf", {}),
     ("test_seqLSTM", {}), ("test_seqTransf", {"tuning": "unipt"})],
)
def test_round_trip_is_bit_identical(tmp_path, name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    with torch.no_grad():  # as if trained: nothing equals its initial value any more
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    save_export(RetrievalTask(model), tmp_path, extra={"t2v_r1": 12.5})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["name"] == name and config["extra"] == {"t2v_r1": 12.5}
    assert config["open_clip_cfg"]["vision_cfg"]["image_size"] == 32
    assert check_export(tmp_path) == config  # header against the model built on the meta device

    loaded = load_export(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for x, y in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(x, y)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in loaded.named_parameters()}
    assert (loaded.tokenizer_name, loaded.image_size, loaded.indexable) == (
        model.tokenizer_name, model.image_size, model.indexable)


def test_bf16_round_trip_keeps_dtype(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_meanP").to(torch.bfloat16).eval()
    save_export(model, tmp_path)
    loaded = load_export(tmp_path)
    assert loaded.logit_scale.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_pickle_is_refused(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_meanP")
    save_export(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_export(tmp_path)
    with pytest.raises(TypeError):
        save_export(model, tmp_path, extra={"not json": object()})


def test_a_run_folder_given_for_its_export_is_said_by_loading_as_by_the_check(tmp_path):
    """check_export pointed at a run folder said it is not an export and where a run keeps one;
    load_export said only 'model.safetensors missing'."""
    save_export(create_model("test_meanP"), tmp_path / "run" / "export")
    for load in (check_export, load_export):
        with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'run'}: not a clipray export, no config.json "
                                                    r"in it \(a training run writes its export to RUN_DIR/export\)"):
            load(tmp_path / "run")


@pytest.mark.parametrize("tower, options", [
    ("vision_cfg", {"timm_model_name": "resnet18", "timm_model_pretrained": True}),
    ("text_cfg", {"hf_model_name": "bert-base-uncased"}),  # open_clip's hf_model_pretrained defaults to true
])
def test_an_export_config_asking_for_hub_weights_is_refused_before_any_fetch(tmp_path, tower, options):
    """config.json's open_clip_cfg is passed to open_clip.CLIP as it is: a timm image tower
    with timm_model_pretrained (or a Hugging Face text tower) made check_export and load_export,
    in every serving replica, fetch the named weights from the hub before loading the
    export's own (here, offline: the hub's "cannot find the requested files", or transformers
    missing); "no download" held only for configs clipray itself writes."""
    from clipray.config import ConfigError

    save_export(create_model("test_meanP"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["open_clip_cfg"][tower].update(options)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for load in (check_export, load_export):
        with pytest.raises(ConfigError, match=r"config\.json: open_clip_cfg asks for pretrained tower weights \(" + tower):
            load(tmp_path)


def test_cut_off_or_foreign_weights_are_a_clear_error(tmp_path):
    """A model.safetensors cut off in a copy or an upload failed inside every index actor and
    Serve replica with safetensors' 'Error while deserializing header: ...', naming no file;
    weights of another head under this config.json failed with a page of state-dict keys."""
    from clipray.config import ConfigError

    export = tmp_path / "my export"
    save_export(create_model("test_meanP"), export)
    weights = export / "model.safetensors"
    data = weights.read_bytes()
    for bad in (data[: len(data) // 2], data[:-10], b"", b"x" * 100):
        weights.write_bytes(bad)
        with pytest.raises(ConfigError, match=rf"^{weights}: not a readable safetensors file \(.+\): "
                                              r"export the model again"):
            load_export(export)
    save_export(create_model("test_seqTransf"), tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=rf"^{weights} does not hold the model its config.json describes "
                                          r"\(meanP head\): unexpected head.blocks.0.attn.in_proj_bias"):
        load_export(export)


def test_weights_and_config_of_two_exports_are_a_clear_error(tmp_path):
    """A run's export is copied over the last call's a file at a time (clip editing's rounds, a
    resume), as is a fetch or an upload: a copy stopped between the files left the new weights
    beside the old config.json, of the same model, and the export loaded without a word with
    the other's recorded sampling and metrics. config.json records its weights' signature; the
    same tensors saved again match, and an export from before the record loads as before."""
    import shutil

    from clipray.config import ConfigError

    torch.manual_seed(0)
    model = create_model("test_meanP")
    old = save_export(model, tmp_path / "old", extra={"epoch": 1})
    new = save_export(create_model("test_meanP"), tmp_path / "new", extra={"epoch": 2})
    again = save_export(model, tmp_path / "again", extra={"epoch": 1})
    assert (again / "model.safetensors").read_bytes() == (old / "model.safetensors").read_bytes()
    for first in ("model.safetensors", "config.json"):  # the copy stopped after this one
        cut = tmp_path / f"cut-{first}"
        shutil.copytree(old, cut)
        shutil.copy(new / first, cut / first)
        for load in (check_export, load_export):
            with pytest.raises(ConfigError, match=rf"^{cut}/model.safetensors and its config.json are of two "
                                                  r"different exports \(a copy of one over the other stopped "
                                                  r"between its files\): copy or export the model again$"):
                load(cut)
    shutil.copy(new / "model.safetensors", again / "model.safetensors")
    config = json.loads((again / "config.json").read_text())
    del config["weights_signature"]  # an export from before the record
    (again / "config.json").write_text(json.dumps(config))
    assert check_export(again)["extra"] == {"epoch": 1}
    load_export(again)


def test_a_config_json_missing_keys_is_a_clear_error(tmp_path):
    """A hand-edited or cut config.json failed with a bare KeyError wherever its first missing
    key was read (in the index's actors or a Serve replica)."""
    from clipray.config import ConfigError

    export = save_export(create_model("test_meanP"), tmp_path / "e")
    config = json.loads((export / "config.json").read_text())
    del config["pixel_stats"], config["open_clip_cfg"]
    (export / "config.json").write_text(json.dumps(config))
    for load in (load_export, check_export):
        with pytest.raises(ConfigError, match=rf"^{export}/config.json: open_clip_cfg, pixel_stats missing; "
                                              "export the model again$"):
            load(export)


@pytest.mark.parametrize("change, says", [
    ({"dtype": "fp16"}, "dtype 'fp16' is none of float32, bfloat16, float16, float64"),
    ({"pixel_stats": None}, "pixel_stats None is not {'mean': [3 numbers], 'std': [3 numbers]}"),
    ({"pixel_stats": {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}}, "pixel_stats {'mean': [0.5, 0.5]"),
    ({"overrides": {"head": "meanp"}}, "describes no model clipray can build (ValueError: unknown head 'meanp'"),
    ({"overrides": []}, "overrides [] is not a mapping with a 'head'"),
    # built the registry's model with its pretrained tag: hub weights fetched, then a traceback
    ({"open_clip_cfg": None}, "open_clip_cfg None is not a mapping"),
    ({"overrides": {"linear_patch": "2d"}}, "overrides {'linear_patch': '2d'} is not a mapping with a 'head'"),
    ({"open_clip_cfg": {}}, "describes no model clipray can build (TypeError"),
])
def test_a_config_json_with_values_it_cannot_load_is_refused_by_the_check_too(tmp_path, change, says):
    """check_export (what a job runs before it starts its actors) passed "dtype": "fp16" and a
    null pixel_stats, which load_export then failed on in each actor; a head, overrides or
    model config it cannot build was a traceback from both."""
    import re

    from clipray.config import ConfigError

    export = save_export(create_model("test_meanP"), tmp_path / "e")
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, **change}))
    for load in (check_export, load_export):
        with pytest.raises(ConfigError, match=rf"^{export}/config.json: {re.escape(says)}"):
            load(export)


@pytest.mark.parametrize("change, says", [
    ({"custom_text": True}, "NotImplementedError: open_clip CustomTextCLIP (HF text towers) is not supported"),
    # a ResNet image tower (open_clip's layers as a list), which neither a 3d patch nor UniPT fits
    ({"vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 32}},
     "NotImplementedError: linear_patch='3d' needs a ViT image tower"),
])
def test_a_config_json_clipray_refuses_to_build_is_a_clear_error(tmp_path, change, says):
    """open_clip_cfg with custom_text (an HF text tower), or a 3d patch over a ResNet image
    tower, is refused by clipray's own builder with a NotImplementedError: check_export and
    load_export let it through, and `clipray index` ended in its traceback, where every other
    config.json clipray cannot build is a line naming the file."""
    import re

    from clipray.config import ConfigError

    export = save_export(create_model("test_meanP", linear_patch="3d"), tmp_path / "e")
    config = json.loads((export / "config.json").read_text())
    config["open_clip_cfg"].update(change)
    (export / "config.json").write_text(json.dumps(config))
    for load in (check_export, load_export):
        with pytest.raises(ConfigError, match=rf"^{export}/config.json: describes no model clipray can build "
                                              rf"\({re.escape(says)}\); export the model again$"):
            load(export)
