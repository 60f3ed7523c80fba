"""Llama 3, Mistral, Qwen2, Qwen3 and Gemma 2 checkpoints in and out, checked against `transformers` itself.

Each family is a tiny randomly initialised `transformers` model built here (2 layers,
d_model 64, every family switch made to matter: llama3 rope scaling, a 4-token
sliding window, biases, q/k norms, soft-capping); nothing is downloaded. Imported,
it computes transformers' logits on a left-padded batch and generates the same
greedy tokens; exported again, it is the same tensors under a config transformers
loads. What jaxgen cannot represent is refused, naming the key.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxgen.errors import ExportError
from jaxgen.outputs.export import export_hf
from jaxgen.outputs.hf_families import FAMILIES, hf_config
from jaxgen.outputs.hf_import import import_hf, read_hf_config
from jaxgen.outputs.runs import OpenedRun, open_run
from jaxgen.sharding import make_mesh, resolve_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.decode import Sampling, Vocabulary, generate
from jaxgen.tasks.layout import MAIN_GROUP, compile_eval_step, fresh_params, plan_models

from conftest import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2}
HF_CONFIGS = {
    "llama": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"sliding_window": 4, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 1.5,
                                "final_logit_softcapping": 2.5}),
}
# What each family's import must switch on in jaxgen.
EXPECTED_SWITCHES = {
    "llama": {"rope_theta": 500_000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_seq_len": 16}},
    "mistral": {"sliding_window": 4, "sliding_window_layers": None},
    "qwen2": {"qkv_bias": True, "sliding_window": 4, "sliding_window_layers": [1]},
    "qwen3": {"qk_norm": True, "tie_embeddings": True},
    "gemma2": {"norm_unit_offset": True, "scale_embeddings": True, "mlp_activation": "gelu_tanh", "post_norms": True,
               "attn_logit_softcap": 1.5, "final_logit_softcap": 2.5, "query_pre_attn_scalar": 8,
               "sliding_window": 4, "sliding_window_layers": [0], "tie_embeddings": True},
}
NEW_TOKENS = 20


def hf_model(family: str):
    """A tiny transformers model with weights large enough (norms away from 1) for every switch to show."""
    class_name, options = HF_CONFIGS[family]
    config = getattr(transformers, class_name)(**COMMON, **options)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def family(request, tmp_path_factory, tokenizer):
    """(name, transformers model, its directory, the jaxgen run imported from it)."""
    name = request.param
    model = hf_model(name)
    hf_dir = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(hf_dir)
    shutil.copyfile(tokenizer.path, hf_dir / "tokenizer.model")
    run_dir = import_hf(hf_dir, hf_dir.parent / "run")
    return name, model, hf_dir, open_run(run_dir)


def forward(run: OpenedRun, ids, positions=None, segments=None) -> np.ndarray:
    """The run's logits, compiled in one piece (op by op is slower for these few calls)."""
    graphdef, params = run.weights.graphdefs[MAIN_GROUP], run.weights.params[MAIN_GROUP]
    args = [jnp.asarray(a) for a in (ids, positions, segments) if a is not None]
    return np.asarray(jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))(params, *args))


def left_padded_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, (3, 20))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def test_import_switches_on_what_the_family_needs(family):
    name, _, _, run = family
    model = run.cfg.model.model_dump(mode="json")
    assert model["family"] == name
    assert {key: model[key] for key in EXPECTED_SWITCHES[name]} == EXPECTED_SWITCHES[name]


def test_imported_logits_equal_transformers_on_a_padded_batch(family):
    _, hf, _, run = family
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    # Padding is a segment of its own: real tokens never attend to it.
    ours = forward(run, ids, positions, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], rtol=0, atol=1e-4)
    assert np.abs(theirs[real]).max() > 1  # logits large enough for the tolerance to mean something


def test_greedy_generation_equals_transformers(family):
    _, hf, _, run = family
    ids, _, _ = left_padded_batch()
    prompts = [ids[0, :10].tolist(), ids[1, :4].tolist(), ids[2, :7].tolist()]
    width = max(map(len, prompts))
    padded = np.asarray([[2] * (width - len(p)) + p for p in prompts])
    attention = np.asarray([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(torch.tensor(padded), attention_mask=torch.tensor(attention), max_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=2, eos_token_id=2)
    theirs = [row[width:].tolist() for row in out]
    theirs = [row[: row.index(2)] if 2 in row else row for row in theirs]
    weights = run.weights
    ours = generate(weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP], prompts, NEW_TOKENS,
                    Vocabulary(eos_id=2, size=hf.config.vocab_size), Sampling(temperature=0))
    assert ours == theirs
    assert max(map(len, ours)) == NEW_TOKENS


def test_export_gives_back_the_same_tensors_and_a_config_transformers_loads(family, tmp_path):
    name, hf, hf_dir, run = family
    out = export_hf(run, tmp_path / "out")
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for tensor, value in original.items():
        assert exported[tensor].dtype == value.dtype
        np.testing.assert_array_equal(exported[tensor], value, err_msg=tensor)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == name and config["architectures"] == [FAMILIES[name].architecture]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    for key in ("layer_types", "sliding_window", "rope_parameters", "attn_logit_softcapping",
                "final_logit_softcapping", "query_pre_attn_scalar", "tie_word_embeddings"):
        assert getattr(reloaded.config, key, None) == getattr(hf.config, key, None), key
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        logits = [m(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy() for m in (hf, reloaded)]
    np.testing.assert_array_equal(*logits)


def test_fine_tuning_an_imported_checkpoint_exports_with_equal_logits(family, tmp_path):
    from jaxgen.config import load_config
    from jaxgen.train.loop import train

    _, _, _, imported = family
    cfg = load_config(imported.run_dir / "config.yaml", [
        f"checkpoint.init_from={imported.run_dir}", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
        "train.sample_tokens=0", "data.batch_size=8", "logging.tensorboard=false", "logging.progress_bar=false"])
    train(cfg, tmp_path / "tuned")
    tuned = open_run(tmp_path / "tuned")
    assert tuned.step == 2 and tuned.cfg.model == imported.cfg.model
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), tuned.weights.params,
                         imported.weights.params)
    assert all(jax.tree.leaves(moved))  # every parameter trained from the imported values
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tuned, tmp_path / "hf"), dtype=torch.float32,
                                                            attn_implementation="eager")
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(forward(tuned, ids, positions, mask)[real], theirs[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_a_jaxgen_model_of_each_family_exports_with_equal_logits(name, tokenizer, tmp_path):
    """A model born in jaxgen (not imported) under each family's switches."""
    switches = [f"model.{field}={json.dumps(value)}" for field, value in EXPECTED_SWITCHES[name].items()
                if field != "rope_scaling"]
    if name == "llama":
        switches += ["model.rope_scaling.factor=8", "model.rope_scaling.original_max_seq_len=16"]
    if name == "gemma2":
        switches.remove("model.query_pre_attn_scalar=8")  # unset: head_dim ** -0.5, written as head_dim
    shutil.copyfile(tokenizer.path, tmp_path / "tokenizer.model")
    cfg = tiny_config(f"model.family={name}", "model.init_std=0.2", "model.head_dim=16", *switches)
    task, mesh, rules = make_task(cfg), make_mesh(cfg.mesh), resolve_rules(cfg.sharding.preset, {})
    layout = plan_models(task, mesh, rules, cfg.train.seed)
    run = OpenedRun(run_dir=tmp_path, cfg=cfg, task=task, mesh=mesh, layout=layout, step=0,
                    weights=layout.weights(jax.jit(lambda: fresh_params(task, cfg.train.seed))()),
                    eval_step=compile_eval_step(task, layout, mesh, rules))
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = np.random.default_rng(1).integers(3, 512, (2, 24))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = forward(run, ids)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- what cannot be represented


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A directory holding only a config.json: every refusal below comes before any tensor is read."""
    return tmp_path_factory.mktemp("config_only")


def config_json(name: str) -> dict:
    """The config.json save_pretrained writes."""
    class_name, options = HF_CONFIGS[name]
    return {**getattr(transformers, class_name)(**COMMON, **options).to_diff_dict(),
            "architectures": [FAMILIES[name].architecture]}


@pytest.mark.parametrize("name, change, match", [
    ("qwen3", {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
     (r"\['Qwen3MoeForCausalLM'\] \(model_type 'qwen3_moe'\) is not supported; jaxgen imports LlamaForCausalLM, "
      r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM")),
    ("qwen3", {"num_experts": 8}, r"key 'num_experts' = 8 is a qwen3 option jaxgen's transformer does not have"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope_parameters.rope_type='yarn' is not supported \(only 'default', 'llama3'\)"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     r"rope_scaling.high_freq_factor is missing"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "attention_factor": 2.0}},
     r"rope_parameters.attention_factor=2.0 is not supported for rope_type 'llama3'"),
    # Both: transformers computes rope_scaling's (test_rope_scaling_beside_rope_parameters_is_what_transformers_reads)
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     r"rope_scaling.rope_type='linear' is not supported \(only 'default', 'llama3'\)"),
    ("gemma2", {"hidden_activation": "gelu"}, r"hidden_activation='gelu' is not supported by jaxgen"),
    ("qwen2", {"layer_types": ["full_attention"]}, r"key 'layer_types' = \['full_attention'\]: expected a list of 2"),
    ("mistral", {"sliding_window": "4096"}, r"key 'sliding_window' = '4096': Input should be a valid integer"),
], ids=["moe_family", "experts_key", "yarn_rope", "rope_key_missing", "rope_key_unknown", "rope_scaling_beside",
        "activation", "layer_types", "window_type"])
def test_what_jaxgen_cannot_represent_is_refused_naming_the_key(config_only, name, change, match):
    (config_only / "config.json").write_text(json.dumps({**config_json(name), **change}))
    with pytest.raises(ExportError, match=match):
        import_hf(config_only, config_only / "out")
    assert not (config_only / "out").exists()


def test_rope_scaling_beside_rope_parameters_is_what_transformers_reads(config_only):
    """A config.json holding both imported with rope_parameters' default rope, while transformers computes the
    linear scaling of rope_scaling: other logits, without a word (refused above, as jaxgen has no linear rope)."""
    both = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}}
    (config_only / "config.json").write_text(json.dumps({**config_json("llama"), **both}))
    theirs = transformers.AutoConfig.from_pretrained(config_only).rope_parameters
    ours, _ = read_hf_config(config_only)
    assert theirs["rope_type"] == "llama3" and theirs["factor"] == 8.0
    assert ours.rope_scaling is not None and ours.rope_scaling.factor == theirs["factor"]


def test_a_gemma2_soft_cap_of_null_is_off_as_in_transformers(config_only):
    """`"attn_logit_softcapping": null` was imported as Gemma 2's default cap (50, and 30 on the logits): the model
    then computed other log-probabilities than the checkpoint's, without a word."""
    without = {"attn_logit_softcapping": None, "final_logit_softcapping": None}
    theirs = transformers.Gemma2Config(**COMMON, **without)
    assert (theirs.attn_logit_softcapping, theirs.final_logit_softcapping) == (None, None)
    caps = {}
    for case, change in {"null": without, "absent": {}}.items():
        written = {k: v for k, v in config_json("gemma2").items() if k not in without}
        (config_only / "config.json").write_text(json.dumps({**written, **change}))
        model, _ = read_hf_config(config_only)
        caps[case] = (model.attn_logit_softcap, model.final_logit_softcap)
    default = transformers.Gemma2Config(**COMMON)
    assert caps == {"null": (None, None),
                    "absent": (default.attn_logit_softcapping, default.final_logit_softcapping)}


@pytest.mark.parametrize("switches, match", [
    (["model.qk_norm=true"], (r"model.qk_norm=True cannot be written as a Hugging Face llama model \(model.family\), "
                              r"which has qk_norm=False; families that have it: qwen3")),
    (["model.family=mistral", "model.sliding_window=8", "model.sliding_window_layers=[0]"],
     r"model.sliding_window_layers=\[0\] cannot be written as a Hugging Face mistral model .*: qwen2, qwen3, gemma2"),
    (["model.family=gemma2"], r"model.norm_unit_offset=False cannot be written as a Hugging Face gemma2 model"),
], ids=["llama_qk_norm", "mistral_some_layers", "gemma2_plain_norm"])
def test_an_export_its_family_cannot_express_is_refused_naming_the_switch(switches, match):
    with pytest.raises(ExportError, match=match):
        hf_config(tiny_config(*switches))
