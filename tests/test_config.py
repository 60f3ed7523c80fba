"""A user's config mistakes each get one clear message before any device work."""

import json
import sys

import pytest

from jaxgen.config import Config, as_saved_now, changed_settings, load_config, parse_overrides
from jaxgen.config_text import load_yaml
from jaxgen.errors import ConfigError
from jaxgen.outputs.runs import load_run_config
from jaxgen.sharding import mesh_shape

from conftest import TINY_CONFIG, tiny_config


def test_yaml_then_overrides():
    cfg = tiny_config("train.steps=50", "mesh.fsdp=4", "optimizer.clip_norm=null")
    assert cfg.train.steps == 50
    assert cfg.mesh.fsdp == 4
    assert cfg.optimizer.clip_norm is None
    assert cfg.model.d_model == 64  # from the YAML file


def test_resolved_config_round_trips(tmp_path):
    cfg = tiny_config("sharding.preset=tp", "sharding.rules.embed=fsdp")
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().train.steps = 3


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*Did you mean 'train.steps'"):
        tiny_config("train.stpes=5")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*Did you mean 'model'"):
        load_config(None, ["modle.d_model=3"])


def test_a_key_given_twice_in_a_config_file_is_refused_naming_its_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n")  # PyYAML alone keeps 128
    with pytest.raises(ConfigError) as refusal:
        load_config(twice)
    assert str(refusal.value) == (f"config file {str(twice)!r}, line 4: key 'd_model' is given twice in one "
                                  "mapping; keep one")
    # A merge key's values may be overridden: that is not a repeat.
    assert load_yaml("base: &b {x: 1, y: 2}\nuse: {<<: *b, x: 3}", "text") == {"base": {"x": 1, "y": 2},
                                                                               "use": {"x": 3, "y": 2}}


def test_a_list_for_a_key_or_an_integer_of_thousands_of_digits_is_named(tmp_path):
    """Both were raw Python errors: `unhashable type: 'list'`, and `Exceeds the limit (4300 digits)`."""
    listed_key = tmp_path / "key.yaml"
    listed_key.write_text("model:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError) as refusal:
        load_config(listed_key)
    assert str(refusal.value) == (f"config file {str(listed_key)!r}, line 2: key ['a', 'b'] is a list; a config key "
                                  "is a name")
    with pytest.raises(ConfigError, match=r"^override 'model.d_model=9+\.\.\. is not valid YAML: line 1, column 1: "
                                          r"a 5000-digit integer is larger than any setting takes$"):
        load_config(None, ["model.d_model=" + "9" * 5000])


@pytest.mark.parametrize("text", ["", "\n", "# model:\n#   d_model: 64\n", "---\n"])
def test_a_config_file_with_no_settings_is_refused(tmp_path, text):
    """A copy cut short, or a `>` that emptied the file, trained the embedded default model instead."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(ConfigError) as refusal:
        load_config(empty)
    assert str(refusal.value) == (f"config file {str(empty)!r} holds no settings (it is empty, or only comments); "
                                  "give its settings, or leave --config out for the embedded default")
    (tmp_path / "braces.yaml").write_text("{}\n")  # saying "the defaults" in so many words is fine
    assert load_config(tmp_path / "braces.yaml") == Config()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(text)  # a run's own: eval, sample and export have no --config
    with pytest.raises(ConfigError, match=r"holds no settings \(it is empty, or only comments\); jaxgen train "
                                          r"wrote the run's settings there: put back a copy"):
        load_run_config(tmp_path / "run")


@pytest.mark.parametrize("text, value", [
    ("010", 10), ("1e-4", 1e-4), ("3e5", 3e5), ("0x1F", 31), ("0o17", 15), (".5", 0.5), ("-.inf", float("-inf")),
    ("1:30", "1:30"), ("1_0", "1_0"), ("yes", "yes"), ("on", "on"), ("2024-01-31", "2024-01-31"), ("true", True),
])
def test_plain_scalars_are_read_as_yaml_1_2_reads_them(text, value):
    """PyYAML follows YAML 1.1: `train.steps=010` trained 8 steps (octal), `train.seed=1:30` was 90 (base 60)."""
    assert load_yaml(f"a: {text}", "t") == {"a": value}


def test_a_leading_zero_or_a_colon_never_changes_a_setting(tmp_path):
    assert tiny_config("train.steps=010").train.steps == 10
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 010\n  seed: 1:30\n")
    with pytest.raises(ConfigError, match=r"'train.seed' = '1:30': Input should be a valid integer"):
        load_config(config)


def test_a_config_file_that_is_not_yaml_is_named_with_its_place_and_a_runs_own_with_what_to_do(tmp_path):
    """PyYAML's own text quoted '<unicode string>' twice and said nothing of where a run's settings are kept."""
    (tmp_path / "run").mkdir()
    cut = tmp_path / "run" / "config.yaml"
    cut.write_text("model:\n  kind: transformer\n  d_model: 64\n  n_la")  # cut short mid-key
    with pytest.raises(ConfigError) as refusal:
        load_config(cut)
    assert str(refusal.value) == (f"config file {str(cut)!r} is not valid YAML: line 4, column 7: could not find "
                                  "expected ':' (while scanning a simple key)")
    with pytest.raises(ConfigError) as refusal:
        load_run_config(tmp_path / "run")
    assert str(refusal.value).startswith(f"config file {str(cut)!r} is not valid YAML: line 4, column 7: ")
    assert str(refusal.value).endswith("; jaxgen train wrote the run's settings there: put back a copy (those each "
                                       "checkpoint was trained with are under \"config\" in "
                                       "checkpoints/<step>/meta/metadata)")


def test_a_wrong_value_names_the_type_expected_as_a_person_reads_it():
    """An optional setting said `(expected Optional)`."""
    for override, expected in [("checkpoint.every_minutes=x", "(expected float or null)"),
                               ("logging.wandb.mode=foo", "(expected 'online' or 'offline' or null)"),
                               ("train.steps=abc", "(expected int)")]:
        with pytest.raises(ConfigError) as refusal:
            load_config(None, [override])
        assert str(refusal.value).endswith(expected), str(refusal.value)


def test_a_setting_added_since_a_checkpoint_was_saved_is_not_named_as_changed():
    """A run saved before `checkpoint.save_timeout_minutes` existed was resumed with the warning 'settings changed
    since it was saved: checkpoint.save_timeout_minutes: (absent) -> 20.0', a change nobody made."""
    now = Config().model_dump(mode="json")
    saved = json.loads(json.dumps(now))
    del saved["checkpoint"]["save_timeout_minutes"]
    assert changed_settings(saved, now) == ["checkpoint.save_timeout_minutes: (absent) -> 20.0"]
    assert changed_settings(as_saved_now(saved), now) == []
    saved["optimizer"]["lr"] = 0.5  # what the user did change is still named
    assert changed_settings(as_saved_now(saved), now) == [f"optimizer.lr: 0.5 -> {now['optimizer']['lr']}"]
    saved["checkpoint"]["a_setting_since_removed"] = 1  # no longer valid: compared as saved
    assert as_saved_now(saved) == saved


def test_numbers_in_exponent_notation_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) read `1e3` and `1e-4` as strings: `train.steps=1e3` was refused as not an integer."""
    assert [load_yaml(text, "text") for text in ("1e3", "1e-4", "-2.5E+2", "1.0e3", "1e", "e3")] == [
        1000.0, 1e-4, -250.0, 1000.0, "1e", "e3"]
    cfg = tiny_config("train.steps=1e3", "optimizer.lr=3e-4")
    assert (cfg.train.steps, type(cfg.train.steps), cfg.optimizer.lr) == (1000, int, 3e-4)
    assert "steps: 1000\n" in cfg.to_yaml()  # saved as the integer it is
    with pytest.raises(ConfigError, match=r"'train.steps' = 1.5: .*fractional part"):
        tiny_config("train.steps=1.5e0")


def test_an_integer_jax_cannot_hold_is_refused_by_the_config():
    """diffusion.sample_steps=1000000000000 trained a whole run, then failed drawing its samples with an
    unexpected OverflowError; larger counts of things took the host's memory for minutes."""
    for setting in ("diffusion.sample_steps=1000000000000", "model.d_model=1e12", "train.steps=3e9",
                    "train.steps=1e30", "train.steps=-1e19"):  # beyond int64 pydantic said "exceeded maximum size"
        key = setting.split("=")[0]
        with pytest.raises(ConfigError, match=rf"{key}: -?[\d.e+]+ is beyond 2,147,483,647, the largest integer JAX "):
            tiny_config(setting)
    assert tiny_config("train.seed=4294967295", "data.index_max_mb=1e12").train.seed == 2**32 - 1  # their own bounds


def test_diffusion_sampling_settings_past_any_use_are_refused_by_the_config():
    """`jaxgen sample` refused --guidance 1e308 (NaN images) and flow --steps 100,000,000 (ran for ever); the
    config keys they stand for are held to the same bounds, so a training run's own grids are too."""
    with pytest.raises(ConfigError, match=r"'diffusion.guidance_scale' = 1e\+300: Input should be less than or "):
        tiny_config("model.kind=dit", "diffusion.guidance_scale=1e300")
    with pytest.raises(ConfigError, match=r"diffusion.sample_steps=1001 is more than jaxgen samples a flow model "
                                          r"with; give 1 to 1000"):
        tiny_config("model.kind=dit", "diffusion.objective=flow", "diffusion.sample_steps=1001")


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train.steps' = 'many'.*expected int"):
        tiny_config("train.steps=many")
    with pytest.raises(ConfigError, match=r"'sharding.preset' = 'zero3'.*'dp', 'fsdp', 'tp' or 'fsdp_tp'"):
        tiny_config("sharding.preset=zero3")


def test_cross_field_errors_name_both_values():
    with pytest.raises(ConfigError, match=r"model.n_heads=4 must be a multiple of model.n_kv_heads=3"):
        tiny_config("model.n_kv_heads=3")
    with pytest.raises(ConfigError, match=r"^invalid config: data.seq_len=128 exceeds model.max_seq_len=64$"):
        tiny_config("data.seq_len=128")  # no `<config>:` before a check across sections
    # A start token past the vocabulary trained a whole run on a NaN loss.
    with pytest.raises(ConfigError, match=r"model.decoder_start_id=2048 is not a token of the vocabulary; valid: 0 "
                                          r"to model.vocab_size - 1 = 2047, or null"):
        load_config(TINY_CONFIG.with_name("t5_tiny.yaml"), ["model.decoder_start_id=2048"])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TINY_CONFIG.with_name("nope.yaml"))


def test_mesh_product_must_match_devices():
    with pytest.raises(ConfigError, match=r"the mesh has 6 devices but 8 are present"):
        mesh_shape(tiny_config("mesh.data=3", "mesh.fsdp=2").mesh, 8)
    with pytest.raises(ConfigError, match=r"only one mesh axis may be -1"):
        mesh_shape(tiny_config("mesh.data=-1", "mesh.fsdp=-1").mesh, 8)
    with pytest.raises(ConfigError, match=r"use 3 devices, which does not divide the 8"):
        mesh_shape(tiny_config("mesh.fsdp=3").mesh, 8)


def test_minus_one_fills_remaining_devices():
    assert mesh_shape(tiny_config("mesh.data=-1", "mesh.tensor=2").mesh, 8) == (4, 1, 2)
    assert mesh_shape(tiny_config("mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2").mesh, 8) == (1, 4, 2)


def test_changed_settings_name_each_key_with_both_values():
    before = load_config(TINY_CONFIG).model_dump(mode="json")
    after = load_config(TINY_CONFIG, ["data.batch_size=32", "train.steps=9", "data.text=/x.txt"]).model_dump(mode="json")
    assert changed_settings(before, after) == ['data.batch_size: 16 -> 32', 'data.text: null -> "/x.txt"']
    assert changed_settings(before, before) == []
    assert changed_settings({"a": {"b": 1}}, {"a": {"b": 1, "c": [1]}, "d": None}) == ["a.c: (absent) -> [1]",
                                                                                      "d: (absent) -> null"]


def test_a_config_given_as_a_pipe_or_a_device_is_read_and_standard_input_is_refused(tmp_path):
    """`--config <(...)` (a pipe), `--config /dev/null` and `--config -` were each said not to exist."""
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # A daemon: were the pipe never opened for reading, the test would fail here, not hang on the writer.
    writer = threading.Thread(target=lambda: fifo.write_text("train:\n  steps: 7\n"), daemon=True)
    writer.start()
    assert load_config(fifo).train.steps == 7
    writer.join(timeout=10)
    with pytest.raises(ConfigError, match=r"^config file '/dev/null' holds no settings"):
        load_config("/dev/null")
    with pytest.raises(ConfigError, match=r"^--config - \(standard input\) is not read; give a YAML file"):
        load_config("-")


def test_a_run_directory_that_is_not_utf_8_is_refused_before_anything_starts(monkeypatch):
    """In a non-UTF-8 locale, a non-ASCII --run-dir failed as `unexpected UnicodeEncodeError`, then (once past
    that) as a checkpoint write the writer's C++ could not take."""
    import argparse

    from jaxgen.cli_arguments import directory_to_write

    with pytest.raises(argparse.ArgumentTypeError, match=r"^'runs/bad\\xffname' is not a UTF-8 path; give a UTF-8 "
                                                         r"name$"):  # a UTF-8 locale: the locale is not to blame
        directory_to_write("runs/bad\udcffname")
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'runs/caf\\xc3\\xa9' is not a UTF-8 path \(the locale is "
                                                         r"ascii\); set a UTF-8 locale"):
        directory_to_write("runs/caf\udcc3\udca9")
