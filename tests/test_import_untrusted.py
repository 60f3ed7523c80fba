"""`jaxgen import` reads a Hugging Face directory someone else made: nothing in it is trusted.

Each test starts from a valid directory (a tiny untrained model, exported), breaks
one thing the way a hostile or damaged checkpoint would, and expects one error
naming the tensor, file or key, with `--out` never created. Exports and imports
that fail halfway leave no output behind either.
"""

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxgen.errors import ExportError
from jaxgen.outputs import safetensors_stream
from jaxgen.outputs.export import export_hf, export_safetensors
from jaxgen.outputs.hf_import import import_hf
from jaxgen.outputs.runs import OpenedRun, open_run
from jaxgen.sharding import make_mesh, resolve_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import compile_eval_step, fresh_params, plan_models

from conftest import REPO, tiny_config
from helpers import run_jaxgen

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    """A tiny Llama-style LM (vocab 512, d_model 64, 2 layers) straight from init, as export sees a run."""
    run_dir = tmp_path_factory.mktemp("run")
    shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")
    cfg = tiny_config(f"data.tokenizer={run_dir / 'tokenizer.model'}")
    task, mesh, rules = make_task(cfg), make_mesh(cfg.mesh), resolve_rules(cfg.sharding.preset, {})
    layout = plan_models(task, mesh, rules, cfg.train.seed)
    return OpenedRun(run_dir=run_dir, cfg=cfg, task=task, mesh=mesh, layout=layout, step=0,
                     weights=layout.weights(fresh_params(task, cfg.train.seed)),
                     eval_step=compile_eval_step(task, layout, mesh, rules))


@pytest.fixture(scope="module")
def valid_hf(tiny_run, tmp_path_factory):
    return export_hf(tiny_run, tmp_path_factory.mktemp("valid") / "hf")


@pytest.fixture
def hf(valid_hf, tmp_path):
    """A fresh copy of the valid directory for one test to break."""
    return shutil.copytree(valid_hf, tmp_path / "hf")


def rewrite_tensors(hf_dir, change):
    tensors = load_file(hf_dir / WEIGHTS)
    change(tensors)
    save_file(tensors, hf_dir / WEIGHTS, metadata={"format": "pt"})


def rewrite_config(hf_dir, change):
    config = json.loads((hf_dir / "config.json").read_text())
    change(config)
    (hf_dir / "config.json").write_text(json.dumps(config))


def index_everything_into(hf_dir, file_of: dict[str, str]):
    """An index mapping every tensor to model.safetensors except those named in `file_of`."""
    weight_map = {name: file_of.get(name, WEIGHTS) for name in load_file(hf_dir / WEIGHTS)}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def refused(hf_dir, out, match):
    with pytest.raises(ExportError, match=match) as raised:
        import_hf(hf_dir, out)
    assert not out.exists()
    assert "\n" not in str(raised.value)
    return str(raised.value)


# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("name, bad_shape, shape", [
    ("model.embed_tokens.weight", (1, 64), (512, 64)),  # numpy would broadcast this row to all 512
    ("model.layers.1.mlp.down_proj.weight", (192, 64), (64, 192)),  # stored the other way round
], ids=["one_row_for_all", "transposed"])
def test_a_tensor_of_the_wrong_shape_is_refused(hf, tmp_path, name, bad_shape, shape):
    rewrite_tensors(hf, lambda t: t.update({name: np.zeros(bad_shape, np.float32)}))
    refused(hf, tmp_path / "out", rf"tensor '{name}' in \S*hf/{WEIGHTS} has shape "
                                  rf"\({bad_shape[0]}, {bad_shape[1]}\), but config.json implies \({shape[0]}, {shape[1]}\)")


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_a_tensor_of_another_dtype_than_declared_is_refused(hf, tmp_path, dtype):
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite_tensors(hf, lambda t: t.update({name: t[name].astype(dtype)}))
    refused(hf, tmp_path / "out", rf"tensor '{name}' in \S*{WEIGHTS} has dtype {np.dtype(dtype).name}, "
                                  "but config.json declares float32")


def test_without_a_declared_dtype_all_tensors_must_agree(hf, tmp_path):
    rewrite_config(hf, lambda c: c.pop("torch_dtype"))
    rewrite_tensors(hf, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.float16)}))
    refused(hf, tmp_path / "out", r"tensor 'model.norm.weight' in \S+ has dtype float16, but "
                                  r"'model.embed_tokens.weight' has float32 and config.json declares no dtype")


def test_a_tensor_the_config_does_not_describe_is_refused(hf, tmp_path):
    extra = "model.layers.2.mlp.up_proj.weight"  # a third layer; config.json says two
    rewrite_tensors(hf, lambda t: t.update({extra: t["model.layers.1.mlp.up_proj.weight"]}))
    refused(hf, tmp_path / "out", rf"{WEIGHTS} holds tensors that config.json does not describe: {extra}")


def test_a_missing_tensor_is_refused(hf, tmp_path):
    rewrite_tensors(hf, lambda t: t.pop("lm_head.weight"))
    refused(hf, tmp_path / "out", "tensors that config.json implies are missing: lm_head.weight")


def test_a_config_naming_its_model_type_but_no_architectures_is_read_as_transformers_reads_it(hf, tmp_path):
    """Refused as `architecture ['llama'] (model_type 'llama') is not supported`, which transformers loads."""
    rewrite_config(hf, lambda c: c.pop("architectures"))
    import_hf(hf, tmp_path / "out")
    assert (tmp_path / "out" / "config.yaml").is_file()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_tensor_holding_nan_or_infinity_is_refused_by_its_name(hf, tmp_path, dtype):
    """Refused only as the checkpoint was written: `refused to commit checkpoint 0: non-finite values in
    params/model/layers/mlp/w_down/kernel`, jaxgen's path rather than the tensor, and status 1."""
    name = "model.layers.1.mlp.down_proj.weight"

    def spoil(tensors):
        for other in tensors:
            tensors[other] = tensors[other].astype(dtype)
        tensors[name][0, :2] = [np.nan, np.inf]

    rewrite_tensors(hf, spoil)
    rewrite_config(hf, lambda c: c.update(torch_dtype=np.dtype(dtype).name))
    refused(hf, tmp_path / "out", rf"^tensor '{name}' in \S*hf/{WEIGHTS} holds 2 non-finite values \(NaN or infinity\) "
                                  r"of 12,288: the checkpoint is damaged, or was saved from a run that diverged")


def test_float16_weights_widen_exactly_into_float32_params(hf, tmp_path, tiny_run):
    rewrite_config(hf, lambda c: c.update(torch_dtype="float16"))
    rewrite_tensors(hf, lambda t: t.update({name: array.astype(np.float16) for name, array in t.items()}))
    out = tmp_path / "empty"
    out.mkdir()  # an existing empty directory is a valid --out
    imported = open_run(import_hf(hf, out)).weights.params
    expected = jax.tree.map(lambda p: np.asarray(p).astype(np.float16).astype(np.float32), tiny_run.weights.params)
    jax.tree.map(np.testing.assert_array_equal, expected, jax.device_get(imported))


def test_rotary_buffers_older_transformers_saved_are_ignored_as_transformers_ignores_them(hf, tmp_path, tiny_run):
    """Llama checkpoints of transformers before 4.31 hold each layer's `rotary_emb.inv_freq`; transformers
    computes the frequencies from config.json instead, and so does jaxgen: the weights import unchanged."""
    config = json.loads((hf / "config.json").read_text())
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(half, np.float32) for i in range(2)}
    rewrite_tensors(hf, lambda t: t.update(buffers))
    imported = open_run(import_hf(hf, tmp_path / "out")).weights.params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tiny_run.weights.params), jax.device_get(imported))

    rewrite_tensors(hf, lambda t: t.update({"model.rotary_emb.inv_freq": np.ones(half + 1, np.float32)}))
    refused(hf, tmp_path / "again", rf"^tensor 'model.rotary_emb.inv_freq' in \S*hf/{WEIGHTS} has shape "
                                    rf"\({half + 1},\), but config.json implies \({half},\) \(half the head "
                                    rf"dimension {2 * half}\)$")


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE"])
def test_an_index_entry_outside_the_directory_is_refused(hf, tmp_path, entry):
    save_file({"lm_head.weight": load_file(hf / WEIGHTS)["lm_head.weight"]}, tmp_path / "outside.safetensors")
    entry = str(tmp_path / "outside.safetensors") if entry == "ABSOLUTE" else entry
    index_everything_into(hf, {"lm_head.weight": entry})
    refused(hf, tmp_path / "out", re.escape(f"model.safetensors.index.json entry '{entry}' resolves to "
                                            f"'{tmp_path}/outside.safetensors', outside '{hf}'"))


def test_a_symlink_out_of_the_directory_is_refused(hf, tmp_path):
    save_file({"lm_head.weight": load_file(hf / WEIGHTS)["lm_head.weight"]}, tmp_path / "outside.safetensors")
    (hf / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index_everything_into(hf, {"lm_head.weight": "model-00002-of-00002.safetensors"})
    refused(hf, tmp_path / "out", r"entry 'model-00002-of-00002.safetensors' resolves to \S+outside.safetensors'")


class _TouchWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return self.path.touch, ()


def test_pickled_weights_are_never_loaded(hf, tmp_path):
    unpickled = tmp_path / "unpickled"
    (hf / WEIGHTS).unlink()
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchWhenUnpickled(unpickled)))
    message = refused(hf, tmp_path / "out", r"holds pytorch_model.bin, but only safetensors are read: "
                                            "pickles are never loaded")
    assert "save_pretrained(NEW_DIR, safe_serialization=True)" in message
    assert not unpickled.exists()


def test_a_broadcastable_tensor_is_refused_by_the_cli_in_one_line(hf, tmp_path):
    name = "model.embed_tokens.weight"
    rewrite_tensors(hf, lambda t: t.update({name: t[name][:1]}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "jaxgen", "import", "--from", str(hf), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxgen: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"tensor '{name}' in {hf}/{WEIGHTS} has shape (1, 64), but config.json implies (512, 64)" in errors[0]
    assert not out.exists()


def test_an_out_inside_the_checkpoint_is_refused_by_the_cli_in_one_line(hf, tmp_path):
    out = hf / "imported"
    result = subprocess.run([sys.executable, "-m", "jaxgen", "import", "--from", str(hf), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"jaxgen: error: --out '{out}' lies inside --from '{hf}', the directory it is made from; name a directory "
        "outside it")
    assert not out.exists()


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("content, match", [
    ("{not json", r"config.json is not valid JSON: Expecting property name"),
    ("[64, 2]", r"config.json must hold a JSON object, not list"),
    ({"hidden_size": None}, r"config.json: required key 'hidden_size' is missing"),
    ({"hidden_size": "64"}, r"config.json: key 'hidden_size' = '64': Input should be a valid integer"),
    ({"num_hidden_layers": 2.5}, r"config.json: key 'num_hidden_layers' = 2.5: Input should be a valid integer"),
    ({"tie_word_embeddings": "no"}, r"config.json: key 'tie_word_embeddings' = 'no': Input should be a valid boolean"),
    ({"rms_norm_eps": -1.0}, r"config.json: key 'rms_norm_eps' = -1.0: Input should be greater than 0"),
    ({"num_attention_heads": 3}, (r"config.json: model.n_heads=3 must be a multiple of model.n_kv_heads=2 "
                                  r"\(in config.json, model.n_heads is 'num_attention_heads', "
                                  r"model.n_kv_heads is 'num_key_value_heads'\)")),
    ({"rope_parameters": "default"}, r"config.json: key 'rope_parameters' = 'default': expected an object"),
    ({"torch_dtype": "float64"}, r"config.json: key 'torch_dtype' = 'float64' cannot be imported without loss"),
], ids=["invalid_json", "not_an_object", "missing_hidden_size", "string_for_int", "float_for_int", "string_for_bool",
        "negative", "heads_not_a_multiple", "rope_parameters_not_an_object", "lossy_dtype"])
def test_a_malformed_config_is_one_line_naming_the_key(hf, tmp_path, content, match):
    if isinstance(content, dict):
        rewrite_config(hf, lambda c: c.update(content))
    else:
        (hf / "config.json").write_text(content)
    refused(hf, tmp_path / "out", match)


def test_what_is_no_model_directory_says_what_it_is(tiny_run, tmp_path):
    """Each was 'is not a Hugging Face model directory (no config.json)', or an architecture ['unknown']."""
    imports = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, "
               "BertForMaskedLM, T5ForConditionalGeneration and diffusers' AutoencoderKL")
    missing, a_file, unet = tmp_path / "missing", tmp_path / "a_file", tmp_path / "unet"
    a_file.write_text("x")
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    weights_only = export_safetensors(tiny_run, tmp_path / "weights_only")
    run_dir = tmp_path / "run"  # a training run: its config.yaml and checkpoints
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(tiny_run.cfg.to_yaml())
    for source, message in [
        (missing, f"'{missing}' does not exist; give a local Hugging Face model directory (with its config.json)"),
        (a_file, f"'{a_file}' is a file; give a local Hugging Face model directory (with its config.json)"),
        (weights_only, (f"'{weights_only}' is a weights-only jaxgen export (--format safetensors), which import "
                        "cannot read; export the run with --format hf (or --format diffusers for an autoencoder), "
                        "or fine-tune from the run directory itself with checkpoint.init_from=RUN_DIR")),
        (unet, (f"{unet}/config.json: diffusers' 'UNet2DConditionModel' is not supported; jaxgen imports {imports} "
                "checkpoints")),
        (run_dir, (f"'{run_dir}' is a jaxgen run directory, which needs no import: sample, eval and export it as "
                   "it is, or fine-tune from it with checkpoint.init_from=RUN_DIR")),
    ]:
        with pytest.raises(ExportError) as raised:
            import_hf(source, tmp_path / "out")
        assert str(raised.value) == message
        assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused_before_any_work(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        import_hf(hf, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_out_that_cannot_be_renamed_onto_is_refused_before_any_work(hf, tmp_path, monkeypatch):
    """A link to an empty directory, or an empty mount point, passed the check; the whole output was then built
    beside it and failed at the last rename (`not a directory`, `Device or resource busy`)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("empty")
    with pytest.raises(ExportError, match=rf"^output '{tmp_path / 'link'}' is a symbolic link \(to 'empty'\); "):
        import_hf(hf, tmp_path / "link")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: pathlib.Path(path) == mounted)  # mounting needs root
    with pytest.raises(ExportError, match=rf"^output '{mounted}' is a mount point, which the output .* cannot "
                                          rf"replace; name a new directory inside it, e.g. '{mounted / 'export'}'$"):
        import_hf(hf, mounted)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing was built beside them
    assert not any((tmp_path / "empty").iterdir()) and not any(mounted.iterdir())


# ----------------------------------------------------------------------------- atomic outputs


@pytest.fixture
def disk_full_after_one_tensor(monkeypatch):
    """Every safetensors file write fails after its first tensor, as on a full disk."""
    write = safetensors_stream.write_safetensors

    def write_then_fail(path, specs, fetch, metadata=None):
        def fetch_once(name):
            if name != specs[0][0]:
                raise OSError(28, "No space left on device")
            return fetch(name)

        return write(path, specs, fetch_once, metadata)

    monkeypatch.setattr(safetensors_stream, "write_safetensors", write_then_fail)


@pytest.mark.parametrize("export", [export_hf, export_safetensors])
def test_an_export_that_fails_halfway_leaves_no_output(tiny_run, tmp_path, disk_full_after_one_tensor, export):
    with pytest.raises(OSError, match="No space left"):
        export(tiny_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither --out nor its hidden partial directory


def test_an_import_that_fails_halfway_leaves_no_output(hf, tmp_path, monkeypatch):
    from jaxgen.outputs import hf_import

    read = hf_import.read_tensor
    calls = []

    def read_then_fail(name, stored):
        calls.append(name)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        return read(name, stored)

    monkeypatch.setattr(hf_import, "read_tensor", read_then_fail)
    with pytest.raises(OSError, match="Input/output error"):
        import_hf(hf, tmp_path / "out" / "run")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_import_onto_a_full_disk_is_one_line_naming_out(hf, tmp_path):
    """Orbax's writer failed with its traceback, the hidden directory's name and a training run's words."""
    out = tmp_path / "out"
    result = run_jaxgen("import", "--from", str(hf), "--out", str(out), file_size_limit=40 * 1024)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip() == f"jaxgen: error: {out}: file too large (a file-size limit was reached)"
    assert list(tmp_path.iterdir()) == [hf]  # neither --out nor its hidden partial directory
