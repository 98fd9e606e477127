"""Config loading: typed sections, dotted overrides, clear errors naming key and file."""

import dataclasses

import pytest
import yaml

from mqsa_core.config import Config, ConfigError, load_config


def test_paper_configs_load_with_the_method_defaults():
    cfg = load_config("configs/beauty.yaml")
    assert (cfg.model.L, cfg.model.alpha, cfg.model.lambda_kd, cfg.model.tau) == (3, 0.5, 0.1, 0.1)
    assert (cfg.data.max_len, cfg.train.batch_size, cfg.train.seed) == (50, 256, 2023)
    assert cfg.data.events.endswith("beauty/events.parquet")


def test_demo_config_sets_every_key():
    """configs/demo.yaml is the commented reference of every key: none may be missing."""
    with open("configs/demo.yaml") as f:
        written = yaml.safe_load(f)
    defaults = Config()
    missing = [
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(defaults)
        for key in dataclasses.fields(getattr(defaults, section.name))
        if key.name not in written.get(section.name, {})
    ]
    assert not missing


def test_overrides_are_typed():
    cfg = load_config(
        "configs/beauty.yaml", ["train.epochs=3", "model.lambda_kd=0", "train.bf16=true"]
    )
    assert cfg.train.epochs == 3 and cfg.model.lambda_kd == 0.0 and cfg.train.bf16 is True


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  epoch: 3\n", "unknown key 'train.epoch'"),
        ("trian:\n  epochs: 3\n", "unknown section 'trian'"),
        ("train:\n  epochs: three\n", "key 'train.epochs' must be int"),
        ("train:\n  bf16: 1\n", "key 'train.bf16' must be bool"),
        ("loss:\n  sampler: zipf\n", "key 'loss.sampler' must be one of"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_config_files_name_the_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_an_unknown_key_suggests_the_nearest_known_one():
    with pytest.raises(ConfigError, match="unknown key 'model.dimm': did you mean 'model.dim'"):
        load_config(None, ["model.dimm=3"])
    with pytest.raises(ConfigError, match="unknown section 'trian': did you mean 'train'"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.zzzzzz=3"])
    assert "did you mean" not in str(err.value)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match="override 'model.dimm=3'.*unknown key 'model.dimm'"):
        load_config(None, ["model.dimm=3"])
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(None, ["epochs"])


def test_python_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train:\n  run_dir: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
