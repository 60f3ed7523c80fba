"""The encoder is BERT: a jaxgen encoder exported loads in transformers' BertForMaskedLM with the same logits on a
padded batch, a BertForMaskedLM imports with the same logits and exports back bit for bit, no token attends across
documents, the modern variant attends both ways, and a sharded forward pass equals one device's."""

import gzip
import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxgen.config import Config, load_config
from jaxgen.config_encoders import EncoderConfig
from jaxgen.data.corpus import BUNDLED_CORPUS
from jaxgen.data.tokenizer import keep_tokenizer, train_tokenizer
from jaxgen.errors import DataError, ExportError
from jaxgen.models.encoder import Encoder, flops_per_token, param_count
from jaxgen.outputs.hf_bert import bert_config, encoder_layout, export_bert, import_bert, is_bert_dir
from jaxgen.outputs.runs import OpenedRun, open_run
from jaxgen.sharding import resolve_rules, with_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP

from conftest import REPO

BERT = {"kind": "encoder", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 32}
MODERN = {**BERT, "positions": "rope", "norm_placement": "pre", "norm": "rmsnorm", "gated_mlp": True, "bias": False,
          "mlp_activation": "silu", "type_vocab_size": 0}
HF_VOCAB = 208  # the WordPiece tokenizer's 200 tokens, rounded up to split over any mesh axis


@pytest.fixture(scope="module")
def lines():
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        return [line.strip() for line in itertools.islice(f, 400)]


@pytest.fixture(scope="module")
def theirs(lines, tmp_path_factory):
    """A random BertForMaskedLM with every bias and LayerNorm moved off its init, and a BERT WordPiece tokenizer,
    saved as transformers saves them."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    wordpiece.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    wordpiece.decoder = decoders.WordPiece()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_act="gelu_new")
    bert = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for parameter in bert.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    out = tmp_path_factory.mktemp("hf") / "bert"
    bert.save_pretrained(out)
    transformers.BertTokenizer(tokenizer_object=wordpiece).save_pretrained(out)
    return bert, out


@pytest.fixture(scope="module")
def imported(theirs, tmp_path_factory):
    return import_bert(theirs[1], tmp_path_factory.mktemp("imported") / "run")


def open_encoder_run(run_dir, overrides=()) -> OpenedRun:
    return open_run(run_dir, None, list(overrides))


def model_of(run: OpenedRun) -> Encoder:
    return run.weights.models()[MAIN_GROUP]


def padded_batch(vocab: int, token_types: bool = True):
    """Three rows of 12, 7 and 3 tokens, right-padded; token type 1 on each row's second half (if any types)."""
    rng = np.random.default_rng(0)
    lengths = np.array([12, 7, 3])
    positions = np.arange(12)
    mask = (positions[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask, rng.integers(5, vocab, (3, 12)), 0).astype(np.int32)
    types = (positions[None] >= lengths[:, None] // 2) & mask.astype(bool) & token_types
    return tokens, mask, types.astype(np.int32)


def max_difference(ours: Encoder, bert, vocab: int) -> float:
    """Largest |jaxgen - transformers| over the real tokens' logits of the padded batch."""
    tokens, mask, types = padded_batch(vocab, token_types=ours.type_embed is not None)
    with torch.no_grad():
        expected = bert(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                        token_type_ids=torch.from_numpy(types).long()).logits.numpy()
    logits = nnx.jit(lambda model, t, s, tt: model(t, s, token_types_BL=tt))(ours, tokens, mask, types)
    real = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(logits)[real] - expected[real])))


def moved_off_init(params: dict) -> dict:
    """Every bias, norm scale and output bias plus 0.3 x noise: a mapping mistake cannot hide behind 0s and 1s."""
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))

    def move(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return x + 0.3 * jax.random.normal(next(keys), x.shape) if name in ("bias", "scale", "output_bias") else x

    return jax.tree_util.tree_map_with_path(move, params)


@pytest.fixture(scope="module")
def sentencepiece(lines, tmp_path_factory):
    return train_tokenizer(lines, 320, tmp_path_factory.mktemp("tok") / "tok.model")


def own_run(tokenizer, run_dir, **model) -> OpenedRun:
    """A randomly initialised encoder (biases and norms moved off their init), as export sees a run."""
    cfg = Config(model={**BERT, "vocab_size": tokenizer.vocab_size, **model},
                 data={"seq_len": 32, "tokenizer": str(tokenizer.path)})
    layout = encoder_layout(cfg)
    run_dir.mkdir()
    keep_tokenizer(tokenizer, run_dir)
    params = jax.jit(lambda: moved_off_init(nnx.to_pure_dict(nnx.state(Encoder(cfg.model, nnx.Rngs(0))))))()
    return OpenedRun(run_dir=run_dir, cfg=cfg, task=None, mesh=None, layout=layout, step=0,
                     weights=layout.weights({MAIN_GROUP: params}), eval_step=None)


def test_jaxgen_encoder_exports_to_bert(sentencepiece, lines, tmp_path):
    run = own_run(sentencepiece, tmp_path / "run", type_vocab_size=3)
    out = export_bert(run, tmp_path / "bert")
    bert = transformers.BertForMaskedLM.from_pretrained(out).eval()
    difference = max_difference(model_of(run), bert, sentencepiece.vocab_size)
    print(f"jaxgen -> BertForMaskedLM: max |logits difference| {difference:.2e}")
    assert difference < 1e-4
    assert is_bert_dir(out) and bert.config.type_vocab_size == 3 and bert.config.hidden_act == "gelu"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id, hf_tokenizer.pad_token_id) == (1, 2, 0)
    assert hf_tokenizer.padding_side == "right"
    text = lines[0][:40]
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == sentencepiece.encode([text])[0]


def test_encoder_without_token_types_exports_a_zero_type_table(sentencepiece, tmp_path):
    """BERT always adds token type 0's row: a row of zeros adds nothing."""
    run = own_run(sentencepiece, tmp_path / "run", type_vocab_size=0)
    out = export_bert(run, tmp_path / "bert")
    assert json.loads((out / "config.json").read_text())["type_vocab_size"] == 1
    types = load_file(out / "model.safetensors")["bert.embeddings.token_type_embeddings.weight"]
    assert types.shape == (1, 32) and not types.any()


def test_imported_bert_has_transformers_logits(theirs, imported):
    run = open_encoder_run(imported)
    assert run.cfg.model.mlp_activation == "gelu_tanh" and run.cfg.model.vocab_size == HF_VOCAB
    difference = max_difference(model_of(run), theirs[0], 200)
    print(f"BertForMaskedLM -> jaxgen: max |logits difference| {difference:.2e}")
    assert difference < 1e-4


def test_import_then_export_gives_the_same_files(theirs, imported, tmp_path):
    out = export_bert(open_encoder_run(imported), tmp_path / "out")
    original, exported = load_file(theirs[1] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].tobytes() == tensor.tobytes(), name
    config, saved = (json.loads((d / "config.json").read_text()) for d in (out, theirs[1]))
    assert config == {key: value for key, value in saved.items() if key != "transformers_version"}
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tokenizer.mask_token_id, hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id) == (4, 2, 3)


def new_encoder(cfg: EncoderConfig) -> Encoder:
    return nnx.jit(lambda: Encoder(cfg, nnx.Rngs(0)))()  # one compilation, not one per initialiser


def with_token(tokens: np.ndarray, index: int, value: int) -> np.ndarray:
    changed = tokens.copy()
    changed[:, index] = value
    return changed


def test_no_token_attends_across_documents():
    """Two documents packed in a row: the first's logits ignore the second and equal its logits alone."""
    model = new_encoder(EncoderConfig(**BERT, vocab_size=64))
    forward = nnx.jit(lambda model, t, s, p: model(t, s, p))
    tokens = np.random.default_rng(0).integers(5, 64, (1, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 6 + [0]], np.int32)
    positions = np.array([[*range(5), *range(6), 0]], np.int32)
    packed = np.asarray(forward(model, tokens, segments, positions))
    changed = np.asarray(forward(model, with_token(tokens, 7, 1), segments, positions))
    first = segments == 1
    alone = np.asarray(forward(model, np.where(first, tokens, 0), first.astype(np.int32), positions))
    np.testing.assert_array_equal(changed[0, :5], packed[0, :5])
    assert not np.allclose(changed[0, 5:11], packed[0, 5:11])
    np.testing.assert_array_equal(alone[0, :5], packed[0, :5])


def test_modern_encoder_attends_both_ways():
    """Pre-norm, RoPE, RMSNorm, gated SiLU MLP, no biases: a later token changes an earlier token's logits."""
    cfg = EncoderConfig(**MODERN, vocab_size=64)
    model = new_encoder(cfg)
    forward = nnx.jit(lambda model, t, s: model(t, s))
    tokens = np.random.default_rng(0).integers(5, 64, (2, 10)).astype(np.int32)
    segments = np.ones_like(tokens)
    before, after = (np.asarray(forward(model, t, segments)) for t in (tokens, with_token(tokens, 8, 1)))
    assert np.isfinite(before).all()
    assert not np.allclose(before[:, 0], after[:, 0])


@pytest.mark.parametrize("model", [BERT, MODERN, {**BERT, "gated_mlp": True, "type_vocab_size": 0}])
def test_param_count_is_the_models(model):
    cfg = EncoderConfig(**model, vocab_size=64)
    state = nnx.state(nnx.eval_shape(lambda: Encoder(cfg, nnx.Rngs(0))))
    assert sum(x.size for x in jax.tree.leaves(state)) == param_count(cfg)


def test_flops_per_token_is_three_forward_passes_as_xla_counts_them():
    """XLA's count of one forward pass also has the norms, activations and softmax (a few percent here).

    Layers unrolled: XLA counts a scanned loop's body once.
    """
    cfg = EncoderConfig(**{**BERT, "d_model": 256, "d_ff": 1024, "max_seq_len": 128, "scan_layers": False},
                        vocab_size=1024)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Encoder(cfg, nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t, jnp.ones_like(t))).lower(state, tokens)
    flops = forward.compile().cost_analysis()["flops"]
    assert flops == pytest.approx(flops_per_token(cfg, 128) * 128 / 3, rel=0.1)


def test_sharded_forward_equals_one_device(imported, devices):
    """The imported run read straight into fsdp (4) x tensor (2) shardings, against its weights on one device."""
    run = open_encoder_run(imported, ["sharding.preset=fsdp_tp", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    kernel = run.weights.params[MAIN_GROUP]["layers"]["attn"]["wq"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    tokens = np.random.default_rng(0).integers(5, 200, (8, 16)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 9 + [2] * 5 + [0] * 2], np.int32), 8, axis=0)
    types = (np.arange(16)[None] % 3 == 0).astype(np.int32).repeat(8, axis=0)

    def forward(params, tokens, segments, types):
        return run.layout.weights(params).models()[MAIN_GROUP](tokens, segments, token_types_BL=types)

    sharded_forward = jax.jit(with_rules(forward, run.mesh, resolve_rules("fsdp_tp", {})))
    sharded = sharded_forward(run.weights.params, tokens, segments, types)
    single = jax.jit(forward)(jax.device_get(run.weights.params), tokens, segments, types)
    print(f"fsdp_tp (4 x 2) vs one device: max |logits difference| {float(jnp.max(jnp.abs(sharded - single))):.2e}")
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("switch,value,message", [
    ("positions", "rope", r"model.positions='rope' cannot be written .* which has positions='learned'"),
    ("norm_placement", "pre", r"model.norm_placement='pre' .* norm_placement='post'"),
    ("norm", "rmsnorm", r"model.norm='rmsnorm' .* norm='layernorm'"),
    ("gated_mlp", True, r"model.gated_mlp=True .* gated_mlp=False"),
    ("bias", False, r"model.bias=False .* bias=True"),
    ("mlp_activation", "silu", r"model.mlp_activation='silu' .* mlp_activation='gelu' or 'gelu_tanh'"),
])
def test_bert_config_refuses_each_switch_bert_lacks(switch, value, message):
    with pytest.raises(ExportError, match=message + r".*; use --format safetensors$") as caught:
        bert_config(EncoderConfig(**{**BERT, switch: value}))
    assert "\n" not in str(caught.value)


def test_bert_config_names_every_switch_at_once():
    with pytest.raises(ExportError) as caught:
        bert_config(EncoderConfig(**MODERN))
    message = str(caught.value)
    assert "\n" not in message
    for switch in ("positions", "norm_placement", "norm", "gated_mlp", "bias", "mlp_activation"):
        assert f"model.{switch}=" in message


@pytest.mark.parametrize("changes,message", [
    ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported by jaxgen's encoder \(only 'gelu', 'gelu_new'"),
    ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key' is not supported"),
    ({"is_decoder": True}, r"is_decoder=True is not supported"),
    ({"architectures": ["BertForPreTraining"]}, r"architectures=\['BertForPreTraining'\] is not supported"),
    ({"use_rope": True}, r"key 'use_rope' = True is a BERT option jaxgen's encoder does not have"),
    ({"hidden_size": 30}, r"not divisible by model.n_heads=4 \(in config.json, .*'hidden_size'"),
])
def test_import_refuses_what_jaxgen_cannot_represent(theirs, changes, message, tmp_path):
    source = tmp_path / "bert"
    source.mkdir()
    config = json.loads((theirs[1] / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ExportError, match=message):
        import_bert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_mask_is_refused_by_import(theirs, tokenizer, tmp_path):
    """A BertForMaskedLM beside a tokenizer with no [MASK] imported, and `sample` then filled nothing: "[MASK]" in
    a prompt was read as letters, exit 0 with no candidates."""
    source = tmp_path / "bert"
    source.mkdir()
    config = json.loads((theirs[1] / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    shutil.copyfile(tokenizer.path, source / "tokenizer.model")  # a plain sentencepiece model: no [MASK]
    with pytest.raises(ExportError, match=rf"^the tokenizer in {source} \(tokenizer.model\) has no \[MASK\] token, "
                                          r"which a masked LM fills in; give the checkpoint's own tokenizer"):
        import_bert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_whose_tokenizer_has_no_mask_is_refused_by_sample(tokenizer, tmp_path):
    """A run imported before that refusal: its sample must say why nothing can be filled, not print no candidates."""
    shutil.copyfile(tokenizer.path, tmp_path / "tokenizer.model")
    task = make_task(load_config(REPO / "configs" / "bert_tiny.yaml"))
    with pytest.raises(DataError, match=rf"^the tokenizer of {tmp_path} has no \[MASK\] token, so this model has "
                                        "nothing to fill in"):
        task.generate(None, tmp_path, 0, {"prompt": ["In the [MASK] God"]}, None)
