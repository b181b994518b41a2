"""Config: YAML + overrides merged onto the typed schema; mistakes name the key and the file."""

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
