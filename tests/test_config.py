"""Config: YAML + overrides merged onto the typed schema; mistakes name the key and the file."""

import dataclasses
import re
from pathlib import Path

import pytest

from clipray.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides_merge_onto_schema(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  batch_size: 16\n  video:\n    max_frames: 8\ntrain:\n  epochs: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain:\n  epochs: 7\nmodel:\n  name: test_seqTransf\n")
    cfg = load_config(child, ["data.video.fps=2.5", "train.zero_stage=2"])
    assert isinstance(cfg, Config)
    assert cfg.data.batch_size == 16 and cfg.data.video.max_frames == 8  # from the parent
    assert cfg.train.epochs == 7 and cfg.model.name == "test_seqTransf"  # child wins
    assert cfg.data.video.fps == 2.5 and cfg.train.zero_stage == 2  # overrides win
    assert cfg.optim.lr == 1e-4  # untouched default


def test_typo_in_yaml_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "epocs" in str(e.value) and "bad.yaml" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "batch_size" in str(e.value) and "bad.yaml" in str(e.value)


def test_a_mistake_in_a_parent_file_names_the_parent_not_the_child(tmp_path):
    """Every paper recipe extends clip4clip_vitb32.yaml: a typo there must not be blamed on msvd.yaml.
    The file named is the one the bad key or value is written in, however far up the chain."""
    grand, parent, child = tmp_path / "grand.yaml", tmp_path / "parent.yaml", tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ntrain:\n  epochs: 2\n")
    parent.write_text("extends: grand.yaml\nmodel:\n  name: test_meanP\n")
    grand.write_text("data:\n  batchsize: 3\n")  # a typo two files up
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value).startswith(f"{grand}: bad key 'data.batchsize': Key 'batchsize' not in 'DataConfig'")
    grand.write_text("data:\n  batch_size: lots\n")  # a wrong type
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value).startswith(f"{grand}: bad key 'data.batch_size': Value 'lots' of type 'str' could not be")
    grand.write_text("data:\n  video:\n    fps: 0\n")  # out of range: named by the file that set it last
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value) == f"{grand}: data.video.fps must be > 0 and at most 1000 (frames per second), got 0.0"
    parent.write_text("extends: grand.yaml\ndata:\n  video:\n    fps: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value) == f"{parent}: data.video.fps must be > 0 and at most 1000 (frames per second), got -1.0"
    with pytest.raises(ConfigError) as e:
        load_config(child, ["data.video.fps=0"])
    assert str(e.value) == ("command-line override: data.video.fps must be > 0 and at most 1000 (frames per second), "
                            "got 0.0")
    child.write_text("extends: parent.yaml\ndata:\n  video:\n    fps: 2\n")  # the child's value wins
    assert load_config(child).data.video.fps == 2.0
    child.write_text("extends: parent.yaml\ntrain:\n  epocs: 2\n")  # and the child's own typo names the child
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value).startswith(f"{child}: bad key 'train.epocs'")


def test_a_tuple_of_the_wrong_length_names_its_key(tmp_path):
    """OmegaConf names no key for it (the message was `bad key '?'`), nor formats its own message for
    a tuple of words ('$VALUE' of type '$VALUE_TYPE')."""
    for value, got in (("[0.9]", "[0.9]"), ("[0.9,0.98,0.99]", "[0.9, 0.98, 0.99]"), ("[a,b]", "['a', 'b']")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"optim.betas={value}"])
        assert str(e.value) == ("command-line override: bad key 'optim.betas': must be a list of 2 values "
                                f"(float, float), got {got}")
    f = tmp_path / "betas.yaml"
    f.write_text("optim:\n  betas: [0.9]\n")
    with pytest.raises(ConfigError, match=rf"^{f}: bad key 'optim.betas': must be a list of 2 values"):
        load_config(f)
    assert load_config(None, ["optim.betas=[0.8,0.9]"]).optim.betas == (0.8, 0.9)


def test_an_interpolation_that_does_not_resolve_names_where_it_is_written(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.manifest=${oops}"])
    assert str(e.value) == "command-line override: data.manifest: Interpolation key 'oops' not found"
    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text("data:\n  manifest: ${oops}\n")
    child.write_text("extends: parent.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value) == f"{parent}: data.manifest: Interpolation key 'oops' not found"
    assert load_config(child, ["data.manifest=${train.run_name}"]).data.manifest.endswith("clipray")
    # one that resolves to what cannot go where it stands names no key of its own: it blamed the
    # config file (or "defaults"), over three lines
    child.write_text("optim:\n  lr: 0.001\n")
    for override, said in (("optim.betas=${oc.env:CLIPRAY_TEST_BETAS}", "optim.betas: Invalid value assigned: str "
                                                                        "is not a TupleConfig, ListConfig, list, or tuple."),
                           ("data.video=${oc.env:CLIPRAY_TEST_BETAS}", "data.video: Invalid type assigned: str is not "
                                                                       "a subclass of VideoConfig. value: [0.9,0.98]")):
        monkeypatch.setenv("CLIPRAY_TEST_BETAS", "[0.9,0.98]")
        with pytest.raises(ConfigError) as e:
            load_config(child, [override])
        assert str(e.value) == f"command-line override: {said}"
    # and a text key's value stays text, tag and all
    assert load_config(None, ["train.run_name=!!bool x"]).train.run_name == "!!bool x"


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="train.no_such_key"):
        load_config(None, ["train.no_such_key=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_value_given_to_a_section_names_the_section_and_its_keys(tmp_path):
    """`data=x` (or `data: x` in a file) where `data.manifest=x` was meant: OmegaConf's own error
    names no key."""
    with pytest.raises(ConfigError, match=r"^command-line override: bad key 'data': a section, not a value: set "
                                          r"its keys instead \(data\.manifest, data\.split, data\.video, "
                                          r"data\.video_root, \.\.\. 17 in all\)$"):
        load_config(None, ["data=/videos/manifest.parquet"])
    with pytest.raises(ConfigError, match=r"bad key 'data.video': a section, not a value: set its keys instead "
                                          r"\(data\.video\.backend, "):
        load_config(None, ["data.video=decord"])
    f = tmp_path / "flat.yaml"
    f.write_text("train: 3\n")
    with pytest.raises(ConfigError, match=rf"^{f}: bad key 'train': a section, not a value"):
        load_config(f)


def refused_as_override_and_in_a_file(load, f: Path, key: str, value: str, says: str) -> None:
    """`load(path, overrides)` refuses `key=value` given as an override and written in the YAML
    file `f`, saying `says` after the source's name."""
    with pytest.raises(ConfigError) as e:
        load(None, [f"{key}={value}"])
    assert str(e.value) == f"command-line override: {says}"
    section, _, leaf = key.rpartition(".")
    f.write_text("".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split(".")))
                 + f"{'  ' * (section.count('.') + 1)}{leaf}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load(f)
    assert str(e.value) == f"{f}: {says}"


@pytest.mark.parametrize("key, value, says", [
    ("data.batch_size", "0", "data.batch_size must be >= 1, got 0"),
    # the start and end-of-text tokens and no word: every caption was the same two tokens
    ("data.max_words", "2", "data.max_words must be >= 3, got 2"),
    ("data.video.fps", "0", "data.video.fps must be > 0 and at most 1000 (frames per second), got 0.0"),
    ("data.video.backend", "decrod", "data.video.backend must be one of decord, pyav, got 'decrod'"),
    ("data.decode_pool", "actor", "data.decode_pool must be one of tasks, actors, got 'actor'"),
    ("data.video.slice", "middle", "data.video.slice must be one of head, tail, uniform, got 'middle'"),
    ("optim.warmup_ratio", "1.0", "optim.warmup_ratio must be in [0, 1), got 1.0"),
    ("train.num_workers", "0", "train.num_workers must be >= 1, got 0"),
    ("train.zero_stage", "5", "train.zero_stage must be one of 0, 1, 2, 3, got 5"),
    ("train.precision", "fp16", "train.precision must be one of auto, fp32, bf16, got 'fp16'"),
    ("ray.num_cpus", "0", "ray.num_cpus must be >= 1, got 0"),
    # inf passed `> 0` / `>= 0`: fps=inf divided by zero in every clip's decode (all skipped),
    # lr=inf trains to NaN (video.timeout_s=inf stays allowed: no limit)
    ("data.video.fps", "inf", "data.video.fps must be a finite number, got inf"),
    # every clip's candidate times counted out one by one: memory filled in every decode task
    ("data.video.fps", "1e9", "data.video.fps must be > 0 and at most 1000 (frames per second), got 1000000000.0"),
    ("data.video.timeout_s", "-inf", "data.video.timeout_s must be a finite number, got -inf"),
    ("optim.lr", "inf", "optim.lr must be a finite number, got inf"),
    ("data.decode_cpus", "inf", "data.decode_cpus must be a finite number, got inf"),
    # with data.shuffle_buffer the seed goes to numpy's default_rng in Ray Data's local shuffle,
    # which raised "expected non-negative integer" in every training worker once Ray was up
    ("train.seed", "-1", "train.seed must be in [0, 2**32), got -1"),
    # torch.manual_seed's OverflowError in every training worker, once Ray was up
    ("train.seed", str(2 ** 64), f"train.seed must be in [0, 2**32), got {2 ** 64}"),
    ("train.storage_path", "''", "train.storage_path must be a folder, or a URI with its bucket (s3://BUCKET/runs), "
                                 "got ''"),
    # Ray's "Invalid address format" traceback, the run folder made
    ("ray.address", "LOCAL", "ray.address must be host:port (a cluster's head, e.g. 10.0.0.5:6379), ray://host:port, "
                             "auto or local, got 'LOCAL'"),
    ("ray.address", "6379", "ray.address must be host:port (a cluster's head, e.g. 10.0.0.5:6379), ray://host:port, "
                            "auto or local, got '6379'"),
    # no host: Ray Client waited 30 s for one, then a ConnectionError traceback
    ("ray.address", "ray://", "ray.address must be host:port (a cluster's head, e.g. 10.0.0.5:6379), ray://host:port, "
                              "auto or local, got 'ray://'"),
    ("train.storage_path", "s3://", "train.storage_path must be a folder, or a URI with its bucket "
                                    "(s3://BUCKET/runs), got 's3://'"),
    # one slash: trained into a local folder ./gs:/b
    ("train.storage_path", "gs:/b/runs", "train.storage_path must be a folder, or a URI with its bucket "
                                         "(s3://BUCKET/runs), got 'gs:/b/runs'"),
    # nan passed every test and was a traceback once the scorers' pool started, after the warm-up
    ("edit.actor_gpus", "nan", "edit.actor_gpus must be a finite number, got nan"),
    ("edit.actor_gpus", "-7", "edit.actor_gpus must be -1 (one per actor where the cluster has GPUs) or >= 0, "
                              "in steps of 0.0001 (Ray's), got -7.0"),
    ("train.cpus_per_worker", "0.00001", "train.cpus_per_worker must be >= 0, in steps of 0.0001 (Ray's), got 1e-05"),
    ("data.decode_cpus", "0", "data.decode_cpus must be > 0, in steps of 0.0001 (Ray's), got 0.0"),
    # 0 read as 1 (every epoch), not as "never" or "at the end only"
    ("train.eval_every_epochs", "0", "train.eval_every_epochs must be >= 1, got 0"),
    # torch's AdamW refuses them, but only in the training workers, after Ray started
    ("optim.betas", "[0.9,1.5]", "optim.betas must be two numbers in [0, 1), got (0.9, 1.5)"),
])
def test_values_out_of_range_name_key_and_source(tmp_path, key, value, says):
    refused_as_override_and_in_a_file(load_config, tmp_path / "run.yaml", key, value, says)
    # the edges that are allowed load, and an unset Optional passes
    assert load_config(None, ["data.shuffle_buffer=0", "optim.warmup_ratio=0", "train.max_failures=-1",
                              "data.max_words=3", f"train.seed={2 ** 32 - 1}", "edit.actor_gpus=-1",
                              "edit.actor_gpus=0.5", "data.video.fps=1000"])
    assert load_config(None).ray.num_cpus is None
    assert load_config(None, ["data.video.timeout_s=inf"]).data.video.timeout_s == float("inf")


def test_serve_config_gets_the_same_video_rules():
    from serve.config import load_app_config

    with pytest.raises(ConfigError, match="command-line override: video.max_frames must be >= 1, got 0"):
        load_app_config(None, ["video.max_frames=0"])
    with pytest.raises(ConfigError, match="serve.log_level must be one of .*, got 'LOUD'"):
        load_app_config(None, ["serve.log_level=LOUD"])
    assert load_app_config(None, ["serve.log_level=WARNING"]).serve.log_level == "WARNING"


@pytest.mark.parametrize("key, value, says", [
    # accepted, then an error from Ray Data's actor pool once Ray was up and the manifest planned
    ("index.actor_cpus", "-1", "index.actor_cpus must be >= 0, in steps of 0.0001 (Ray's), got -1.0"),
    # Ray's ValueError ("precision ... cannot go beyond 0.0001") once the replica or actor was made
    ("serve.text_encoder.num_gpus", "0.00001", "serve.text_encoder.num_gpus must be >= 0, in steps of 0.0001 "
                                               "(Ray's), got 1e-05"),
    ("index.actor_gpus", "0.00005", "index.actor_gpus must be -1 (one per actor where the cluster has GPUs) or "
                                    ">= 0, in steps of 0.0001 (Ray's), got 5e-05"),
    ("index.actor_gpus", "nan", "index.actor_gpus must be a finite number, got nan"),
    # nan passed `< 0`, and planning the windows ended in an IndexError traceback
    ("index.window_s", "nan", "index.window_s must be a finite number, got nan"),
    ("index.recall_queries", "-1", "index.recall_queries must be >= 0, got -1"),
    ("index.batch", "0", "index.batch must be >= 1, got 0"),
    # every query was the start and end-of-text tokens alone: one vector, one answer, whatever the text
    ("serve.max_words", "2", "serve.max_words must be >= 3, got 2"),
    ("serve.limits.rerank_candidates", "-1", "serve.limits.rerank_candidates must be >= 0, got -1"),
    # these were refused, but in resolve() with no file named
    ("serve.port", "70000", "serve.port must be a port, 1..65535, got 70000"),
    ("index.kind", "ivf", "index.kind must be one of flat, ivf_flat, ivf_sq8, ivf_pq, hnsw, got 'ivf'"),
    ("serve.searcher.num_gpus", "-1", "serve.searcher.num_gpus must be >= 0, in steps of 0.0001 (Ray's), got -1.0"),
    # Serve's "Application name must a non-empty string" came after Ray and Serve had started
    ("serve.app_name", "''", "serve.app_name must be a name, got ''"),
])
def test_index_and_serve_values_out_of_range_name_key_and_source(tmp_path, key, value, says):
    """`clipray index` / `clipray serve` values get the rules every other command's do, at load:
    the key and the file (or override) named, before Ray starts."""
    from serve.config import load_app_config

    refused_as_override_and_in_a_file(load_app_config, tmp_path / "app.yaml", key, value, says)
    # the edges that are allowed load
    cfg = load_app_config(None, ["index.actor_cpus=0", "index.recall_queries=0", "serve.limits.rerank_candidates=0",
                                 "serve.port=65535", "index.window_s=4", "serve.ingress.min_replicas=0",
                                 "serve.max_words=3"])
    assert (cfg.index.stride_s, cfg.serve.port, cfg.index.actor_gpus) == (2.0, 65535, -1.0)


def test_env_vars_hold_text_not_mappings_or_lists(tmp_path):
    """`serve.*.env_vars` is a mapping of texts, which OmegaConf does not hold its values to:
    `env_vars.A.B=1` gave the replicas A="{'B': 1}", and `C: [1, 2]` in a file C='[1, 2]'."""
    from serve.config import load_app_config

    with pytest.raises(ConfigError, match=r"^serve.text_encoder.env_vars.A: an environment variable's value is "
                                          r"text, got \{'B': 1\}"):
        load_app_config(None, ["serve.text_encoder.env_vars.A.B=1"])
    f = tmp_path / "s.yaml"
    f.write_text("serve:\n  ingress:\n    env_vars:\n      C: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^serve.ingress.env_vars.C: an environment variable's value is text"):
        load_app_config(f)
    assert load_app_config(None, ["serve.ingress.env_vars.C=[1,2]"]).serve.ingress.env_vars == {"C": "[1,2]"}


def test_a_window_stride_longer_than_the_window_is_refused():
    """index.window_s=4 index.stride_s=100 loaded, and `windows(30, 4, 100)` gave (0, 4) and
    (26, 30): 22 s of each video never indexed. A stride up to the window loads."""
    from serve.config import load_app_config
    from serve.index import windows

    with pytest.raises(ConfigError, match=r"^index.stride_s=100 is longer than index.window_s=4: the time between"):
        load_app_config(None, ["index.window_s=4", "index.stride_s=100"])
    cfg = load_app_config(None, ["index.window_s=4", "index.stride_s=4"])
    spans = windows(30.0, cfg.index.window_s, cfg.index.stride_s)
    assert spans[0][0] == 0 and spans[-1][1] == 30 and all(b[0] <= a[1] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("override, says", [
    ("model.name=test_meanp", "model.name: unknown model 'test_meanp'; registered: clip4clip_vitb16_meanP"),
    ("model.head=meanp", "model.head must be one of meanP, seqLSTM, seqTransf, tightTransf, got 'meanp'"),
    ("model.linear_patch=3D", "model.linear_patch must be one of 2d, 3d, got '3D'"),
    ("model.tuning=frozn", "model.tuning must be one of frozen, full, unipt, got 'frozn'"),
])
def test_model_names_are_checked_against_the_registries_before_ray_starts(override, says):
    from train.driver import model_io

    with pytest.raises(ConfigError) as e:
        model_io(load_config(None, [override]))
    assert str(e.value).startswith(says)
    assert model_io(load_config(None, ["model.head=seqTransf", "model.linear_patch=3d"])).data.video.size > 0


@pytest.mark.parametrize("overrides, says", [
    (["model.pretrained=openai"], "model.pretrained=openai: not a pretrained tag of clipray-tiny (it has none) "
                                  "nor a local checkpoint file"),
    (["model.name=clip4clip_vitb32_meanP", "model.pretrained=laion2b_s34b_b79k"],
     "model.pretrained=laion2b_s34b_b79k: not a pretrained tag of ViT-B-32-quickgelu (its tags: openai, "),
    (["model.name=clip4clip_vitb32_meanP", "model.pretrained=s3://bucket/ViT-B-32.pt"],
     "model.pretrained=s3://bucket/ViT-B-32.pt: not a pretrained tag of ViT-B-32-quickgelu"),
])
def test_weights_open_clip_cannot_load_are_refused_before_ray_starts(overrides, says):
    """open_clip loads a tag it knows for the model or a local file; anything else was a
    RuntimeError traceback from every training worker once Ray had started."""
    from train.driver import model_io

    with pytest.raises(ConfigError) as e:
        model_io(load_config(None, overrides))
    assert str(e.value).startswith(says)


def test_an_exports_weights_as_model_pretrained_are_refused_before_ray_starts(tmp_path):
    """A training run's export/model.safetensors given as model.pretrained (to go on from a
    trained model, or a run folder moved and its export taken for a checkpoint) passed the check
    as a local file, and open_clip failed on its keys in every training worker once Ray was up
    (RuntimeError: Missing key(s) in state_dict: "positional_embedding", ...)."""
    from clipray.export import save_export
    from clipray.models import create_model
    from train.driver import model_io

    weights = save_export(create_model("test_meanP"), tmp_path / "run" / "export") / "model.safetensors"
    with pytest.raises(ConfigError, match=rf"^model.pretrained={weights}: the weights of a clipray export "
                                          r"\(a training run's export/\), not an open_clip checkpoint; a run goes on"):
        model_io(load_config(None, [f"model.pretrained={weights}"]))


def test_weights_open_clip_can_load_pass_the_model_check(tmp_path):
    import open_clip
    import torch

    from clipray.models.backbone import register_tiny_configs
    from train.driver import model_io

    register_tiny_configs()
    weights = tmp_path / "w.pt"  # the default model's own weights, as a DataParallel run saves them
    state = open_clip.create_model("clipray-tiny", nonscalar_logit_scale=True).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)
    for overrides in (["model.name=clip4clip_vitb32_meanP", "model.pretrained=openai"],
                      ["model.name=clip4clip_vitb32_meanP", "model.pretrained=LAION400M-E32"],  # open_clip's spelling rules
                      [f"model.pretrained={weights}"], ["model.pretrained=none"], ["model.pretrained="], []):
        model_io(load_config(None, overrides))


def test_a_file_open_clip_cannot_load_into_the_model_is_refused_before_ray_starts(tmp_path):
    """A local model.pretrained passed as soon as it was a file: a text file (a download's error
    page), or another model's weights, failed in every training worker once Ray was up (a
    pickle KeyError, or open_clip's AssertionError "text pos_embed width changed!")."""
    import open_clip
    import torch

    from clipray.models.backbone import open_clip_config
    from train.driver import model_io

    page = tmp_path / "ViT-B-32.pt"
    page.write_text("<html>403 Forbidden</html>")
    other = tmp_path / "wider.pt"  # weights of another open_clip model than the config's: twice as wide
    cfg = open_clip_config("clipray-tiny")
    torch.save(open_clip.CLIP(**dict(cfg, embed_dim=2 * cfg["embed_dim"]), nonscalar_logit_scale=True).state_dict(),
               other)
    for weights, name in ((page, "clipray-tiny"), (other, "clipray-tiny"), (other, "ViT-B-32-quickgelu")):
        model = ["model.name=clip4clip_vitb32_meanP"] if name != "clipray-tiny" else []
        with pytest.raises(ConfigError, match=rf"^model.pretrained={weights}: open_clip cannot load this file as "
                                              rf"the weights of {name} \(\w+"):
            model_io(load_config(None, [*model, f"model.pretrained={weights}"]))


@pytest.mark.parametrize("tuning", ["frozen", "unipt"])
def test_a_3d_patch_that_could_not_train_is_refused_before_ray_starts(tuning):
    from train.driver import model_io

    with pytest.raises(ConfigError, match=f"model.linear_patch, model.tuning: linear_patch '3d' needs tuning "
                                          f"'full': tuning '{tuning}' runs CLIP's image tower without autograd"):
        model_io(load_config(None, ["model.linear_patch=3d", f"model.tuning={tuning}"]))
    assert model_io(load_config(None, [f"model.tuning={tuning}"])).model.tuning == tuning


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_training_recipe_loads_and_fits_its_model(path):
    from train.driver import model_io

    cfg = model_io(load_config(path))
    assert cfg.data.video.size in (32, 224) and cfg.train.epochs >= 1


def test_a_file_that_is_not_yaml_keys_is_refused_in_a_line(tmp_path):
    """A YAML list, or any text file given by mistake, names the file in one short line."""
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- train\n")
    with pytest.raises(ConfigError, match=r"list.yaml: a config file holds `key: value` lines; "
                                          r"this one reads as a list"):
        load_config(listed)
    prose = tmp_path / "notes.txt"  # one long plain scalar, which OmegaConf reads as a key
    prose.write_text("remember to " * 200 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(prose)
    assert str(e.value).startswith(f"{prose}: bad key 'remember to remember to")
    assert "...' not in 'Config'" in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("text, says", [
    ("train:\n  epochs: [1\n", "line 3, column 1: did not find expected ',' or ']' "
                                "(while parsing a flow sequence at line 2)"),
    ("train:\n  epochs: 1\n  epochs: 2\n", "line 3, column 3: found duplicate key epochs "
                                            "(while constructing a mapping at line 2)"),
    ("train:\n\tepochs: 1\n", "line 2, column 1: found character that cannot start any token"),
])
def test_a_yaml_syntax_error_is_one_line_with_its_place(text, says, tmp_path):
    """PyYAML's message is four lines that name the file twice: the CLI's one-line error broke
    over them. Now the file, then the line and column as an editor counts them."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value).startswith(f"{bad}: not valid YAML: {says}") and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["train", "edit", "index", "serve"])
def test_a_command_without_its_config_names_the_one_missing_argument(command, capsys):
    """The overrides are optional, so only CONFIG is reported missing, under the command's name."""
    from clipray.cli import main

    with pytest.raises(SystemExit) as e:
        main([command])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[0].startswith(f"usage: clipray {command} [-h] config [overrides ...]")
    assert err[-1] == f"clipray {command}: error: the following arguments are required: config"


def test_a_pretrained_file_that_is_not_there_fails_at_load(tmp_path):
    """`model.pretrained` naming a missing local file: a config error now, not a traceback from
    every training worker once Ray and the workers are up. Tags and files that exist pass."""
    with pytest.raises(ConfigError, match=r"^model.pretrained=/nonexistent.pt: no such file \(give an open_clip tag"):
        load_config(None, ["model.pretrained=/nonexistent.pt"])
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert load_config(None, [f"model.pretrained={weights}"]).model.pretrained == str(weights)
    assert load_config(None, ["model.pretrained=openai"]).model.pretrained == "openai"
    assert load_config(None, ["model.pretrained=''"]).model.pretrained == ""  # none, as open_clip reads it


def test_an_empty_value_for_a_text_key_is_the_empty_text(tmp_path):
    """`checkpoint=` (a variable that expanded to nothing) used to fail as "Incompatible value
    'None' for field of type 'str'"; a text key now gets "" and the command's own check says
    what it needs. An optional key still reads `key=` as unset."""
    from serve.config import load_app_config

    assert load_app_config(None, ["checkpoint="]).checkpoint == ""
    assert load_config(None, ["data.manifest="]).data.manifest == ""
    assert load_config(None, ["model.pretrained="]).model.pretrained is None


@pytest.mark.parametrize("value", ["0612", "007", "1:30", "yes", "off", "1e3", "0x1F", ".5", "it's 1",
                                   "ablation #2", "#1", "a: b", "[x]", "{x}", "*.parquet", "@home", "'a' b"])
def test_a_text_key_keeps_the_text_given_on_the_command_line(value, tmp_path):
    """YAML read `train.run_name=0612` as the octal 394 and the run went to the folder `394`;
    `007` was "7", `1:30` (sexagesimal) "90", `yes` "True", `1e3` "1000.0"; `ablation #2` was
    "ablation" (a comment: the run of `ablation #1`, whose checkpoints it resumed), and `a: b`,
    `[x]`, `*.parquet`, `@home` failed as a mapping, a list or no YAML. A text key now holds the
    text given, on the command line and from `serve run` / RayService args; number keys still
    read numbers, and quotes, null and interpolations still read as YAML and OmegaConf do."""
    from serve.app import AppArgs, arg_overrides
    from serve.config import load_app_config

    assert load_config(None, [f"train.run_name={value}"]).train.run_name == value
    assert load_config(None, [f"data.tokenizer={value}"]).data.tokenizer == value
    assert load_config(None, [f"model.pretrained={value}"]).model.pretrained == value  # an Optional text
    args = AppArgs.model_validate({"checkpoint": value})  # a RayService's `args:`, as build_app reads them
    assert load_app_config(None, arg_overrides(args)).checkpoint == value
    env = load_app_config(None, [f"serve.ingress.env_vars.X={value}"]).serve.ingress.env_vars  # a mapping of texts
    assert env["X"] == value
    cfg = load_config(None, ["train.epochs=12", "optim.lr=1e-3", "train.use_gpu=yes", "train.run_name=${train.epochs}"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.use_gpu, cfg.train.run_name) == (12, 1e-3, True, "12")
    cfg = load_config(None, ["train.run_name='0612'", 'data.tokenizer="a\\tb"', "model.pretrained=null", "ray.address=~"])
    assert (cfg.train.run_name, cfg.data.tokenizer, cfg.model.pretrained, cfg.ray.address) == ("0612", "a\tb", None, None)


@pytest.mark.parametrize("folder", ["r${x}", "runs #2", "a ${b} c${", "$x {y}", "plain"])
def test_the_demos_folders_reach_the_config_as_written(folder, tmp_path):
    """`clipray demo --runs 'r${x}'` (or --data) put the folder into an override as it was, and
    its `${x}` was taken for an interpolation: "Interpolation key 'x' not found", blamed on an
    override the user never gave, after the videos were made."""
    from pathlib import Path

    from clipray.demo import as_text

    path = tmp_path / folder
    cfg = load_config(None, [f"train.storage_path={as_text(path)}", f"data.manifest={as_text(path / 'm.parquet')}"])
    assert (cfg.train.storage_path, cfg.data.manifest) == (str(path), str(path / "m.parquet"))
    assert Path(cfg.train.storage_path).name == folder


@pytest.mark.parametrize("value", ["0612", "007", "1:30", "yes", "off", "1e3", "0x1F", ".5", "it's 1", "2026-12-05"])
def test_a_text_key_keeps_the_text_written_in_a_config_file(value, tmp_path):
    """The same rules in a YAML file: `run_name: 0612` trained into the run folder `394`,
    `1:30` into `90`, `yes` into `True`, `2026-12-05` stayed (a date, read back as text). What
    YAML syntax gives a file (a comment after ` #`, a quoted value) still holds there."""
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  run_name: {value}\ndata:\n  tokenizer: {value}  # a comment\n"
                 f"model:\n  pretrained: {value}\n")
    cfg = load_config(f)
    assert (cfg.train.run_name, cfg.data.tokenizer, cfg.model.pretrained) == (value, value, value)
    f.write_text("train:\n  run_name: '0612'\n  seed: ${train.epochs}\nmodel:\n  pretrained: null\n")
    cfg = load_config(f)
    assert (cfg.train.run_name, cfg.train.seed, cfg.model.pretrained) == ("0612", cfg.train.epochs, None)


def test_number_and_boolean_overrides_read_as_a_person_writes_them(tmp_path, monkeypatch):
    """YAML 1.1 read a leading zero as octal: train.epochs=010 trained 8 epochs, ray.num_cpus=010
    sized Ray for 8. OmegaConf took any whole number as a boolean: train.use_gpu=2 (or -1) was
    true. A leading zero now reads as decimal, and a boolean refuses a number but 0 and 1."""
    cfg = load_config(None, ["train.epochs=010", "optim.lr=01", "train.seed=00", "ray.num_cpus=010"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.seed, cfg.ray.num_cpus) == (10, 1.0, 0, 10)
    assert load_config(None, ["train.epochs=0x10"]).train.epochs == 16  # a prefix says its base
    for value in ("2", "-1", "10"):
        with pytest.raises(ConfigError, match=f"^command-line override: train.use_gpu must be true or false, got {value}$"):
            load_config(None, [f"train.use_gpu={value}"])
    assert [load_config(None, [f"train.use_gpu={v}"]).train.use_gpu for v in ("0", "1", "on", "false")] == \
        [False, True, True, False]
    # and in a file (`epochs: 010` trained 8 epochs there; `use_gpu: 2` was true)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 010\n  seed: 00\noptim:\n  lr: 01\nray:\n  num_cpus: 010\n")
    cfg = load_config(f)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.seed, cfg.ray.num_cpus) == (10, 1.0, 0, 10)
    refused_as_override_and_in_a_file(load_config, f, "train.use_gpu", "2", "train.use_gpu must be true or false, got 2")
    # quoted, or through an interpolation, the number went past that check and was true
    f.write_text("train:\n  use_gpu: '2'\n")
    with pytest.raises(ConfigError, match=f"^{f}: train.use_gpu must be true or false, got '2'$"):
        load_config(f)
    monkeypatch.setenv("CLIPRAY_TEST_GPUS", "2")
    for value, said in (("'-1'", "'-1'"), ('"2"', "'2'"), ("${oc.env:CLIPRAY_TEST_GPUS}", "'2'"),
                        ("${train.epochs}", "5")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"train.use_gpu={value}", "train.epochs=5"])
        assert str(e.value) == f"command-line override: train.use_gpu must be true or false, got {said}"
    assert [load_config(None, [f"train.use_gpu={v}"]).train.use_gpu for v in (
        "'0'", '"true"', "${oc.env:CLIPRAY_TEST_NONE,1}", "'off'")] == [False, True, True, False]


def test_serve_builder_args_of_any_yaml_type_load_as_written():
    """A RayService's `args:` reach build_app typed by YAML; they were turned into overrides by
    str(): a null became the text 'None' ("Value 'None' of type 'str' could not be converted to
    Float") and a backslash in a mapping's text was doubled (Python's repr, single-quoted)."""
    import yaml

    from serve.app import AppArgs, arg_overrides
    from serve.config import load_app_config

    args = AppArgs.model_validate(yaml.safe_load(r"""
        config: serve/configs/demo.yaml
        serve.text_encoder.look_back_period_s: null
        serve.searcher.max_replicas: 3
        serve.searcher.env_vars: {WIN_PATH: 'C:\models', SAY: "it's"}
        serve: {reranker: {num_cpus: 0.25}, limits: {max_k: 7}}
        index.window_s: 2.5
    """))
    cfg = load_app_config(args.config, arg_overrides(args))
    sv = cfg.serve
    assert sv.text_encoder.look_back_period_s is None and sv.searcher.max_replicas == 3
    assert sv.searcher.env_vars == {"WIN_PATH": "C:\\models", "SAY": "it's"}
    assert (sv.reranker.num_cpus, sv.limits.max_k, cfg.index.window_s) == (0.25, 7, 2.5)


@pytest.mark.parametrize("step", ["0.0005", "0.0015", "0"])
def test_an_edit_step_finer_than_the_millisecond_clips_are_kept_to_is_refused(step):
    with pytest.raises(ConfigError, match=f"edit.step_s must be a whole number of milliseconds, >= 0.001, got {step}"):
        load_config(None, [f"edit.step_s={step}"])
    for ok in ("0.001", "0.25", "1", "2.5"):
        assert load_config(None, [f"edit.step_s={ok}"]).edit.step_s == float(ok)


def test_a_minimum_clip_width_under_the_millisecond_clips_are_kept_to_is_refused():
    # initial_clips([4.9999, 5.0, 5.0001], 10, min_width_s=0.0001) gave the clip (5.0, 5.0) once
    # rounded to the millisecond, and round 0's manifest was refused after stage 1
    with pytest.raises(ConfigError, match="edit.min_width_s must be >= 0.001, got 0.0001"):
        load_config(None, ["edit.min_width_s=0.0001"])
    assert load_config(None, ["edit.min_width_s=0.001"]).edit.min_width_s == 0.001


def test_an_unclosed_interpolation_says_how_to_write_the_text(tmp_path):
    """`train.run_name=cost${5` was said not to read as YAML, showing the value as quoted inside
    and advising a quote, which failed again: it is OmegaConf's interpolation grammar, and `\\${`
    is how the text is written. In a file the same line named no key in words."""
    pattern = "mismatched input '<EOF>' expecting {BRACKET_OPEN, INTER_CLOSE, '.'}"
    for key, value in (("train.run_name", "cost${5"), ("train.epochs", "${5")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"])
        assert str(e.value) == (f"command-line override: bad key '{key}': the value '{value}' is no interpolation "
                                f"({pattern}); for a text, write each ${{ as \\${{")
    assert load_config(None, ["train.run_name=cost\\${5"]).train.run_name == "cost${5"  # as it says
    (tmp_path / "c.yaml").write_text("train:\n  run_name: exp${1\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert str(e.value) == (f"{tmp_path}/c.yaml: train.run_name is no interpolation ({pattern}); "
                            "for a text, write each ${ as \\${")
    (tmp_path / "c.yaml").write_text("train:\n  run_name: exp\\${1\n")
    assert load_config(tmp_path / "c.yaml").train.run_name == "exp${1"


def test_values_of_the_wrong_shape_or_not_yaml_are_one_line_naming_the_key(tmp_path, capsys):
    """Each was a Python traceback from the CLI: an override whose value YAML cannot read (a
    yaml ScannerError: `*` starts an alias, `@` no token; a text key takes it as text), a mapping where a list belongs (a
    TypeError from OmegaConf's merge), a list inside betas (a TypeError in its range rule) and
    a list where a mapping belongs."""
    from clipray.cli import main
    from serve.config import load_app_config

    for key, value, why in (("train.epochs", "*3", "found undefined alias"),
                            ("optim.betas", "[0.9, 0.98", "did not find expected ',' or ']'"),
                            # a YAML tag PyYAML builds itself: its ValueError, a traceback
                            ("train.epochs", "!!float x", "could not convert string to float: 'x'"),
                            # `key==`: the select for `key=`'s empty text raised ConfigTypeError
                            ("optim.betas.1", "=", "could not determine a constructor for the tag "
                                                   "'tag:yaml.org,2002:value'")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"])
        assert str(e.value) == (f"command-line override: bad key '{key}': the value '{value}' does not "
                                f"read as YAML ({why}); quote a text value: \"{key}='{value}'\"")
    (tmp_path / "ok.yaml").write_text("train:\n  epochs: 1\n")
    assert main(["train", str(tmp_path / "ok.yaml"), "train.epochs=@3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipray train: error: command-line override: bad key 'train.epochs'") and err.count("\n") == 1

    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  betas: {b1: 0.9}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: bad key 'optim.betas': must be a list of 2 values (float, float), got {{'b1': 0.9}}"
    with pytest.raises(ConfigError, match=r"^command-line override: optim.betas must be two numbers in \[0, 1\), "
                                          r"got \(\[0.9\], 0.98\)$"):
        load_config(None, ["optim.betas=[[0.9],0.98]"])
    with pytest.raises(ConfigError, match=r"^command-line override: bad key 'serve.ingress.env_vars': a mapping, not a "
                                          r"value: set its keys instead \(serve.ingress.env_vars.NAME=value\)$"):
        load_app_config(None, ["serve.ingress.env_vars=[A=1]"])
    assert load_app_config(None, ["serve.ingress.env_vars={A: 1}"]).serve.ingress.env_vars == {"A": "1"}


def test_a_relative_config_missing_here_points_at_cliprays_copy_without_loading_it(tmp_path, monkeypatch):
    """`clipray train train/configs/demo.yaml` run from another folder said only "config file not
    found: <there>/train/configs/demo.yaml", while `clipray serve serve/configs/demo.yaml` loaded
    the repository's copy. Training reads the file it is given (a Ray job reads its working_dir's,
    and a silent fallback would train a user's edited file's defaults instead), so the error names
    clipray's copy; serve keeps its fallback, which its replicas need (their folder is not the
    checkout)."""
    from clipray.config import SOURCE_ROOT
    from serve.config import load_app_config

    monkeypatch.chdir(tmp_path)
    ours = SOURCE_ROOT / "train" / "configs" / "demo.yaml"
    assert ours.is_file()
    with pytest.raises(ConfigError) as e:
        load_config("train/configs/demo.yaml")
    assert str(e.value) == (f"config file not found: {tmp_path.resolve()}/train/configs/demo.yaml (a relative path "
                            f"is read from the current folder; clipray's own copy is {ours})")
    with pytest.raises(ConfigError) as e:  # no copy of ours by that name: the plain message
        load_config("train/configs/nope.yaml")
    assert str(e.value) == f"config file not found: {tmp_path.resolve()}/train/configs/nope.yaml"
    # a file here of that name is the one read, not ours
    (tmp_path / "train" / "configs").mkdir(parents=True)
    (tmp_path / "train" / "configs" / "demo.yaml").write_text("train:\n  epochs: 7\n")
    assert load_config("train/configs/demo.yaml").train.epochs == 7
    assert load_app_config("serve/configs/demo.yaml").serve.ingress is not None  # serve's fallback


def test_a_parent_or_config_file_that_cannot_be_read_names_the_file_that_asks_for_it(tmp_path):
    """`extends: missing.yaml` said only "config file not found: <dir>/missing.yaml", not which
    file named it; `extends: [a]` looked for a file called "['a']" and `extends: ''` for the
    folder; a config given as a URI was reported as a local path Path() had folded
    (s3://b/c.yaml -> <cwd>/s3:/b/c.yaml)."""
    child = tmp_path / "run.yaml"
    child.write_text("extends: base.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(e.value) == f"{child}: bad key 'extends: base.yaml': config file not found: {tmp_path / 'base.yaml'}"
    (tmp_path / "base.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"bad key 'extends: base.yaml': config file not found: .*base.yaml \(a folder\)$"):
        load_config(child)
    for value, given in (("[a.yaml]", "['a.yaml']"), ("''", "''"), ("3", "3")):
        child.write_text(f"extends: {value}\n")
        with pytest.raises(ConfigError) as e:
            load_config(child)
        assert str(e.value) == f"{child}: bad key 'extends': names one YAML file (relative to this one), got {given}"
    from serve.config import load_app_config

    for load in (load_config, load_app_config):
        with pytest.raises(ConfigError, match=r"^s3://b/c.yaml: a config file is read from a local path, not a URI"):
            load("s3://b/c.yaml")
    (tmp_path / "base.yaml").rmdir()  # and the working chain still loads
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 3\n  seed: 7\n")
    child.write_text("extends: base.yaml\ntrain:\n  epochs: 2\n")
    assert (load_config(child).train.epochs, load_config(child).train.seed) == (2, 7)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_config_yaml_a_run_saves_loads_back_to_the_same_config(path, tmp_path, monkeypatch):
    """`<run>/config.yaml` (train.driver writes config.to_yaml) is the run's config: loaded back
    it is the same. A `${` in a value (a run name given as `\\${x}`, an environment variable that
    holds one) was written as is and read back as an interpolation: "Interpolation key 'x' not
    found"."""
    from clipray.config import to_yaml

    monkeypatch.setenv("CLIPRAY_TEST_VALUE", "from-env-${HOME}")
    for overrides in ([], [r"train.run_name=a\${x}", "data.tokenizer=${oc.env:CLIPRAY_TEST_VALUE}",
                           r"data.split=val", "data.video.timeout_s=inf", "optim.betas=[0.5,0.75]"]):
        cfg = load_config(path, overrides)
        saved = tmp_path / "config.yaml"
        saved.write_text(to_yaml(cfg))
        assert load_config(saved) == cfg
    assert (cfg.train.run_name, cfg.data.tokenizer) == ("a${x}", "from-env-${HOME}")
    weird = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_name="a\\${x}\\\\${y}"))
    saved.write_text(to_yaml(weird))
    assert load_config(saved).train.run_name == "a\\${x}\\\\${y}"


def _names_code(dotted: str) -> bool:
    """Whether `dotted` names a Python module or attribute (`train.edit`, `ray.wait`,
    `serve.smoke_model.fit_tiny`), which docs write in the same form as config keys."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_config_key_the_docs_name_is_in_a_schema():
    """Each `section.key` the READMEs and docs/ give as an override (`key=`) or in backticks is a
    key of the training schema (`clipray.config.Config`) or of the index/serve one
    (`serve.config.AppConfig`): a key renamed in code, or misspelt in a doc, would be a command
    that stops at start-up when copied. `serve.<name>.*` stands for any deployment section."""
    import dataclasses
    import re
    import typing

    from serve.config import AppConfig

    def has(schema, key: str) -> bool:
        for part in key.split("."):
            if part == "*" or (part == "<name>" and schema is typing.get_type_hints(AppConfig)["serve"]):
                return True
            if not dataclasses.is_dataclass(schema) or part not in {f.name for f in dataclasses.fields(schema)}:
                return False
            schema = typing.get_type_hints(schema)[part]
        return True

    repo = Path(__file__).resolve().parents[1]
    docs = [repo / "README.md", repo / "cluster" / "README.md", repo / "datasets" / "README.md",
            *sorted((repo / "docs").glob("*.md"))]
    key = re.compile(r"(?:(?<=`)|(?<=\s)|^)((?:data|model|optim|train|ray|edit|index|serve|video)"
                     r"\.[a-z_<][a-z0-9_.*<>]*[a-z0-9_*])(?==|`)")
    found, unknown = 0, []
    for doc in docs:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for k in key.findall(line):
                if k.rsplit(".", 1)[-1] in ("json", "yaml", "csv", "parquet", "md", "py", "faiss"):
                    continue  # a file name (index.json, index.faiss)
                found += 1
                if not (has(Config, k) or has(AppConfig, k) or _names_code(k)):
                    unknown.append(f"{doc.relative_to(repo)}:{n}: {k}")
    assert found > 100 and not unknown, unknown


def test_every_config_key_is_named_in_the_docs():
    """The other way round: each key of the training and index/serve schemas is named in the
    READMEs or docs/, as `section.key`, or as `key` in a paragraph that lists its section's keys
    (`data.*`: `video.fps`; `serve.<name>.*`: `num_cpus`; `serve.limits.*`: `max_k`). Thirteen
    keys a user can set were in no doc (optim.warmup_ratio, ray.address, edit.min_width_s,
    index.recall_queries, data.video_root, serve.<name>.initial_replicas, ...)."""
    import re
    import typing

    from serve.config import DEPLOYMENTS, AppConfig

    def keys(schema, prefix=""):
        for f in dataclasses.fields(schema):
            t = typing.get_type_hints(schema)[f.name]
            yield from keys(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [prefix + f.name]

    repo = Path(__file__).resolve().parents[1]
    docs = [repo / "README.md", repo / "cluster" / "README.md", repo / "datasets" / "README.md",
            *sorted((repo / "docs").glob("*.md"))]
    text = "\n\n".join(d.read_text() for d in docs)
    paragraphs = re.split(r"\n\s*\n", text)

    def named(key: str) -> bool:
        parts = key.split(".")
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text):
            return True
        for i in range(1, len(parts)):
            sections = {".".join(parts[:i])}
            if i == 2 and parts[0] == "serve" and parts[1] in DEPLOYMENTS:
                sections.add("serve.<name>")
            rest = f"`{'.'.join(parts[i:])}`"
            if any(rest in p and any(f"`{s}.*`" in p for s in sections) for p in paragraphs):
                return True
        return False

    all_keys = sorted({*keys(Config), *keys(AppConfig)})
    assert len(all_keys) > 100 and not [k for k in all_keys if not named(k)], [k for k in all_keys if not named(k)]


def test_a_recipe_on_fewer_workers_is_refused_with_the_batch_size_that_keeps_its_global_batch(tmp_path):
    """The paper recipes train at a global batch of 128 (8 workers x 16): on 4 GPUs, 64 clips a
    step scored each caption against half the negatives, without a word. `train.global_batch`
    states the recipe's batch and the load refuses another, naming the batch size that keeps it."""
    recipe = REPO / "train" / "configs" / "msrvtt_9k.yaml"
    cfg = load_config(recipe)
    assert (cfg.train.global_batch, cfg.data.batch_size, cfg.train.num_workers) == (128, 16, 8)
    with pytest.raises(ConfigError) as e:
        load_config(recipe, ["train.num_workers=4"])
    assert str(e.value) == (
        f"{REPO / 'train' / 'configs' / 'clip4clip_vitb32.yaml'}: train.global_batch is 128, but data.batch_size=16 x "
        "train.num_workers=4 is 64: the contrastive loss scores each caption against that batch's clips, so the "
        "recipe's results need its batch. Give data.batch_size=32, or train.global_batch=0 to train at 64 "
        "(and to resume a run begun at it; train.grad_accum adds steps, not negatives)")
    assert load_config(recipe, ["train.num_workers=4", "data.batch_size=32"]).train.global_batch == 128
    assert load_config(recipe, ["train.num_workers=4", "train.global_batch=0"]).data.batch_size == 16
    # accumulation is no substitute: it adds steps, not negatives
    with pytest.raises(ConfigError, match=r"is 64: .*Give data.batch_size=32"):
        load_config(recipe, ["train.num_workers=4", "train.grad_accum=2"])
    # a worker count that does not divide it, and the override that set it named as the source
    with pytest.raises(ConfigError, match=r"^command-line override: .*x train.num_workers=3 is 48: .*Give a "
                                          r"data.batch_size x train.num_workers of 128, or"):
        load_config(recipe, ["train.num_workers=3", "train.global_batch=128"])
    with pytest.raises(ConfigError, match=r"train.global_batch must be >= 0, got -1"):
        load_config(recipe, ["train.global_batch=-1"])
    assert load_config(REPO / "train" / "configs" / "demo.yaml", ["train.num_workers=3"]).train.global_batch == 0


def test_a_ray_client_address_without_a_port_is_checked_at_its_default_port(monkeypatch):
    """`ray.address=ray://HOST` is Ray Client's default port, 10001: it was not checked, and
    where nothing answered ray.init waited 30 s, then a ConnectionError traceback."""
    import socket

    from clipray.runtime import check_answers

    tried = []

    def refuse(where, timeout=None):
        tried.append(where)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for address in ("ray://10.0.0.5", "ray://10.0.0.5/", "RAY://[::1]"):
        with pytest.raises(ConfigError, match=f"ray.address={re.escape(address)}: nothing answers there"):
            check_answers(address, "ray.address")
    assert tried == [("10.0.0.5", 10001), ("10.0.0.5", 10001), ("::1", 10001)]
    with pytest.raises(ConfigError):  # a port given is the one checked
        check_answers("ray://10.0.0.5:20001", "ray.address")
    assert tried[-1] == ("10.0.0.5", 20001)
