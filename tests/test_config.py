"""Config: YAML + overrides merged onto the typed schema; mistakes name the key and the file."""

from pathlib import Path

import pytest

from clipray.config import Config, ConfigError, load_config


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
                                          r"data\.video_root, \.\.\. 16 in all\)$"):
        load_config(None, ["data=/videos/manifest.parquet"])
    with pytest.raises(ConfigError, match=r"bad key 'data.video': a section, not a value: set its keys instead "
                                          r"\(data\.video\.backend, "):
        load_config(None, ["data.video=decord"])
    f = tmp_path / "flat.yaml"
    f.write_text("train: 3\n")
    with pytest.raises(ConfigError, match=rf"^{f}: bad key 'train': a section, not a value"):
        load_config(f)


@pytest.mark.parametrize("key, value, says", [
    ("data.batch_size", "0", "data.batch_size must be >= 1, got 0"),
    ("data.video.fps", "0", "data.video.fps must be > 0, got 0.0"),
    ("data.video.backend", "decrod", "data.video.backend must be one of decord, pyav, got 'decrod'"),
    ("data.decode_pool", "actor", "data.decode_pool must be one of tasks, actors, got 'actor'"),
    ("data.video.slice", "middle", "data.video.slice must be one of head, tail, uniform, got 'middle'"),
    ("optim.warmup_ratio", "1.0", "optim.warmup_ratio must be in [0, 1), got 1.0"),
    ("train.num_workers", "0", "train.num_workers must be >= 1, got 0"),
    ("train.zero_stage", "5", "train.zero_stage must be one of 0, 1, 2, 3, got 5"),
    ("train.precision", "fp16", "train.precision must be one of auto, fp32, bf16, got 'fp16'"),
    ("ray.num_cpus", "0", "ray.num_cpus must be >= 1, got 0"),
])
def test_values_out_of_range_name_key_and_source(tmp_path, key, value, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert str(e.value) == f"command-line override: {says}"
    f = tmp_path / "run.yaml"
    section, _, leaf = key.rpartition(".")
    f.write_text("".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split(".")))
                 + f"{'  ' * (section.count('.') + 1)}{leaf}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {says}"
    # the edges that are allowed load, and an unset Optional passes
    assert load_config(None, ["data.shuffle_buffer=0", "optim.warmup_ratio=0", "train.max_failures=-1"])
    assert load_config(None).ray.num_cpus is None


def test_serve_config_gets_the_same_video_rules():
    from serve.config import load_app_config

    with pytest.raises(ConfigError, match="command-line override: video.max_frames must be >= 1, got 0"):
        load_app_config(None, ["video.max_frames=0"])
    with pytest.raises(ConfigError, match="serve.log_level must be one of .*, got 'LOUD'"):
        load_app_config(None, ["serve.log_level=LOUD"])
    assert load_app_config(None, ["serve.log_level=WARNING"]).serve.log_level == "WARNING"


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


@pytest.mark.parametrize("command", ["train", "edit", "index", "serve"])
def test_a_command_without_its_config_names_the_one_missing_argument(command, capsys):
    """The overrides are optional, so only CONFIG is reported missing, under the command's name."""
    from clipray.cli import main

    with pytest.raises(SystemExit) as e:
        main([command])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[0].startswith(f"usage: clipray {command} [-h] config [overrides ...]")
    assert err[-1] == f"clipray {command}: error: the following arguments are required: config"
