"""The encoder-decoder is transformers' T5ForConditionalGeneration: exports load there with the same logits and
greedy generations, imports export back bit for bit; packed pairs never see each other, the decoder never sees
its future, KV-cache decoding equals teacher forcing, and a sharded forward pass equals one device's."""

import functools
import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from jaxgen.config import Config
from jaxgen.config_encoders import EncoderDecoderConfig
from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.tokenizer import keep_tokenizer, load_tokenizer, sentinel_piece, train_tokenizer
from jaxgen.errors import ExportError
from jaxgen.models.t5 import T5, flops_per_token, param_count, relative_buckets
from jaxgen.outputs.hf_t5 import export_t5, import_t5, is_t5_dir, t5_config
from jaxgen.outputs.hf_tokenizer import write_hf_tokenizer
from jaxgen.outputs.runs import OpenedRun, open_run
from jaxgen.sharding import make_mesh, resolve_rules, with_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.decode import Sampling, Vocabulary, text_stream
from jaxgen.tasks.layout import MAIN_GROUP, compile_eval_step, fresh_params, plan_models
from jaxgen.tasks.seq2seq_decode import _generate, bucket_length, generate_targets
from jaxgen.tasks.text_inputs import spaces_taken

from helpers import copies_in_token_loop

transformers = pytest.importorskip("transformers")

# Few buckets with short distances, so that short rows reach T5's logarithmic buckets; init_std 0.5 keeps
# logits within a few units, so that absolute tolerances mean what they say.
MODEL = {"kind": "encoder_decoder", "vocab_size": 384, "d_model": 32, "n_layers": 2, "n_decoder_layers": 3,
         "n_heads": 4, "d_ff": 48, "relative_buckets": 8, "relative_max_distance": 20, "init_std": 0.5}
SENTINELS = 8
BOS, EOS = 1, 2


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A jaxgen tokenizer of the bundled corpus with span-corruption sentinels (t5.model), and the same as
    Hugging Face files (tokenizer.json, tokenizer_config.json), as an export writes them."""
    directory = tmp_path_factory.mktemp("tokenizer")
    documents = itertools.islice(iter_documents([BUNDLED_CORPUS]), 400)
    trained = train_tokenizer(documents, MODEL["vocab_size"], directory / "t5.model",
                              special_pieces=[sentinel_piece(i) for i in range(SENTINELS)])
    write_hf_tokenizer(trained, directory, 64)
    (directory / "tokenizer.model").unlink()
    return directory


def own_run(run_dir, tokenizer_dir, **changes) -> OpenedRun:
    """A model born in jaxgen, every norm moved off 1, as export sees a run."""
    run_dir.mkdir(exist_ok=True)
    keep_tokenizer(load_tokenizer(tokenizer_dir / "t5.model"), run_dir)
    cfg = Config(model={**MODEL, **changes}, data={"tokenizer": str(run_dir / "tokenizer.model")})
    task, mesh, rules = make_task(cfg), make_mesh(cfg.mesh), resolve_rules(cfg.sharding.preset, {})
    layout = plan_models(task, mesh, rules, cfg.train.seed)
    params = off_one(jax.jit(lambda: fresh_params(task, cfg.train.seed))())
    return OpenedRun(run_dir=run_dir, cfg=cfg, task=task, mesh=mesh, layout=layout, step=0,
                     weights=layout.weights(params), eval_step=compile_eval_step(task, layout, mesh, rules))


def off_one(params, seed: int = 1):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params))))

    def move(path, x):
        key = next(keys)
        return x + 0.3 * jax.random.normal(key, x.shape) if str(path[-1].key) == "scale" else x

    return jax.tree_util.tree_map_with_path(move, params)


@pytest.fixture(scope="module")
def run(tokenizer_dir, tmp_path_factory) -> OpenedRun:
    return own_run(tmp_path_factory.mktemp("t5") / "run", tokenizer_dir)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export_t5(run, tmp_path_factory.mktemp("t5") / "hf")


def model_of(run: OpenedRun) -> tuple:
    return run.layout.graphdefs[MAIN_GROUP], run.weights.params[MAIN_GROUP]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, *batch):
    return nnx.merge(graphdef, params)(*batch)


def logits(graphdef, params, *batch) -> np.ndarray:
    return np.asarray(_forward(graphdef, params, *batch))


def padded(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens and segment ids (1 real, 0 padding)."""
    tokens = np.zeros((len(rows), width), np.int32)
    for row, ids in zip(tokens, rows):
        row[:len(ids)] = ids
    return tokens, (np.arange(width)[None] < np.asarray([len(r) for r in rows])[:, None]).astype(np.int32)


def random_rows(rng, lengths: list[int], vocab: int = MODEL["vocab_size"]) -> list[list[int]]:
    return [rng.integers(3 + SENTINELS, vocab, n).tolist() for n in lengths]


def hf_model(directory):
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


# ----------------------------------------------------------------------------- export to transformers


def assert_transformers_logits(ours_run: OpenedRun, theirs) -> None:
    """Logits on a padded batch (inputs and targets of several lengths, one of a single token) agree."""
    rng = np.random.default_rng(0)
    input_lens, target_lens = [13, 6, 1, 9], [7, 3, 5, 1]
    inputs, input_segments = padded(random_rows(rng, input_lens), 16)
    targets, target_segments = padded(random_rows(rng, target_lens), 8)
    ours = logits(*model_of(ours_run), inputs, input_segments, targets, target_segments)
    with torch.no_grad():
        reference = theirs(input_ids=torch.from_numpy(inputs), attention_mask=torch.from_numpy(input_segments),
                           decoder_input_ids=torch.from_numpy(targets)).logits.numpy()
    worst = max(np.abs(ours[b, :n] - reference[b, :n]).max() for b, n in enumerate(target_lens))
    print(f"max |jaxgen - transformers| logits: {worst:.2e} (logits up to {np.abs(reference).max():.1f})")
    assert worst < 1e-4
    assert np.all(np.isfinite(ours))  # padding rows and columns too


def test_transformers_gives_jaxgen_logits_on_a_padded_batch(run, exported):
    theirs = hf_model(exported)
    assert not theirs.config.scale_decoder_outputs and theirs.lm_head.weight is not theirs.shared.weight
    assert_transformers_logits(run, theirs)


def test_export_carries_the_tokenizer_with_its_sentinels_whole(run, exported, tmp_path):
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    ours = load_tokenizer(run.run_dir)
    sentinels = [sentinel_piece(i) for i in range(SENTINELS)]
    whole = {ours.piece_id(p) for p in sentinels}
    for text in ("In the beginning <extra_id_0> created the heaven  <extra_id_7> the earth.", "<extra_id_1> and"):
        # As `jaxgen sample` reads a prompt: a sentinel takes the spaces before it, as in training.
        assert theirs(text, add_special_tokens=False).input_ids == spaces_taken(ours.encode([text])[0], whole, ours)
    text = "In the beginning <extra_id_0> created the heaven <extra_id_7> the earth."
    assert theirs.convert_tokens_to_ids(sentinels) == [ours.piece_id(p) for p in sentinels]
    assert {ours.piece_id(sentinels[0]), ours.piece_id(sentinels[7])} <= set(ours.encode([text])[0])  # whole
    config = json.loads((exported / "config.json").read_text())
    assert (config["decoder_start_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, 0)
    assert is_t5_dir(exported) and not is_t5_dir(tmp_path)
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        export_t5(run, exported)


def test_greedy_generation_equals_transformers(run, exported):
    theirs = hf_model(exported)
    tokenizer = load_tokenizer(run.run_dir)
    texts = ["And God said, Let there be light", "and there was light.", "Jesus wept."]
    inputs = [ids + [EOS] for ids in tokenizer.encode(texts)]
    n = 12
    ours = generate_targets(*model_of(run), inputs, n, BOS, EOS, Sampling(temperature=0.0), seed=0)
    input_ids, mask = padded(inputs, max(map(len, inputs)))
    with torch.no_grad():
        # Without its cache: transformers sizes that by num_layers, the encoder's (fewer here than the decoder's).
        generated = theirs.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                                    do_sample=False, num_beams=1, max_new_tokens=n, use_cache=False).numpy()
    assert (generated[:, 0] == BOS).all()
    reference = [row[1:].tolist() for row in generated]
    reference = [row[:row.index(EOS)] if EOS in row else row for row in reference]
    print("generated:", ours)
    assert ours == reference
    assert sum(map(len, ours)) >= n and max(len(set(row)) for row in ours) > 2  # not a trivial answer

    # `sample` with one input streams its text as it is decoded, a piece a token; the same tokens, the same text.
    pieces = []
    streamed = generate_targets(*model_of(run), inputs, n, BOS, EOS, Sampling(temperature=0.0), seed=0,
                                on_token=text_stream(tokenizer, pieces.append))
    assert streamed == ours and len(pieces) == len(ours[0]) and "".join(pieces) == tokenizer.decode(ours[0])


def test_inputs_in_one_bucket_compile_once(run):
    assert [bucket_length(n) for n in (1, 16, 17, 33)] == [16, 16, 32, 64]
    rng = np.random.default_rng(0)
    greedy = Sampling(temperature=0.0)
    generate_targets(*model_of(run), random_rows(rng, [5, 3, 8]), 12, BOS, EOS, greedy, seed=0)
    compiled = _generate._cache_size()
    generate_targets(*model_of(run), random_rows(rng, [9, 14, 1]), 12, BOS, EOS, greedy, seed=1)
    assert _generate._cache_size() == compiled


def test_sampling_keeps_to_the_tokenizers_ids_and_repeats_with_its_seed(run):
    inputs = random_rows(np.random.default_rng(0), [5, 9, 2])
    sampling = Sampling(temperature=1.0, top_k=20)
    first = generate_targets(*model_of(run), inputs, 12, BOS, EOS, sampling, seed=3, vocab_size=64)
    assert first == generate_targets(*model_of(run), inputs, 12, BOS, EOS, sampling, seed=3, vocab_size=64)
    assert all(0 <= token < 64 for row in first for token in row) and sum(map(len, first)) > 12


# ----------------------------------------------------------------------------- import from transformers


def save_theirs(directory, tokenizer_dir, tie: str, seed: int = 0):
    """A random T5 v1.1 (norms and embeddings moved off their init) saved by save_pretrained, with a tokenizer.

    tie: "untied" (its own lm_head), "tied" (scaled: T5 v1.0's output; with a SiLU gate here), "tied-unscaled"
    (what transformers 5 makes of a v1.1 it initialises).
    """
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=MODEL["vocab_size"], d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-silu" if tie == "tied" else "gated-gelu", dropout_rate=0.1, decoder_start_token_id=0, eos_token_id=EOS,
        tie_word_embeddings=tie == "tied")
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
        if tie == "untied":
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, directory / name)
    return model


@pytest.mark.parametrize("tie", ["untied", "tied", "tied-unscaled"])
def test_imports_compute_as_transformers_and_export_back_the_same_tensors(tokenizer_dir, tmp_path, tie):
    theirs = save_theirs(tmp_path / "hf", tokenizer_dir, tie)
    assert (theirs.lm_head.weight is theirs.shared.weight) == (tie != "untied")
    assert theirs.config.scale_decoder_outputs == (tie == "tied")
    run = open_run(import_t5(tmp_path / "hf", tmp_path / "run"))
    # Tied but unscaled is imported untied, its output layer a copy of the embedding.
    assert run.cfg.model.tie_embeddings == (tie == "tied") and run.cfg.model.decoder_start_id == 0
    assert_transformers_logits(run, theirs)

    out = export_t5(run, tmp_path / "out")
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    if tie == "tied-unscaled":
        assert exported.pop("lm_head.weight").tobytes() == original["shared.weight"].tobytes()
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].tobytes() == tensor.tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_start_token_id"] == 0 and config["d_kv"] == 8 and config["num_decoder_layers"] == 3


def rewrite_config(directory, **changes) -> None:
    config = {**json.loads((directory / "config.json").read_text()), **changes}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


@pytest.mark.parametrize("changes,message", [
    ({"feed_forward_proj": "relu"}, r"feed_forward_proj='relu' \(T5 v1.0's ungated MLP\) is not supported"),
    ({"feed_forward_proj": ...}, r"feed_forward_proj='relu' \(T5 v1.0's ungated MLP\)"),
    ({"feed_forward_proj": "gated-relu"}, r"feed_forward_proj='gated-relu' is not supported.*'gated-gelu'"),
    ({"architectures": ["T5EncoderModel"]}, r"architectures=\['T5EncoderModel'\] is not supported"),
    ({"model_type": ...}, r"model_type=None is not supported; jaxgen imports T5ForConditionalGeneration"),
    ({"scale_decoder_outputs": True}, r"scaled by d_model \*\* -0.5 .* has its own lm_head.weight"),
    ({"is_gated_act": False}, r"is_gated_act=False is not supported"),
    ({"relative_attention_bidirectional": True}, r"key 'relative_attention_bidirectional' = True is a T5 option"),
    ({"num_heads": 3}, r"relative_attention_bias.weight' in .* has shape \(8, 4\), but config.json implies \(8, 3\)"),
    ({"d_kv": "8"}, r"key 'd_kv' = '8': Input should be a valid integer"),
])
def test_import_refuses_what_jaxgen_cannot_represent(tokenizer_dir, tmp_path, changes, message):
    save_theirs(tmp_path / "hf", tokenizer_dir, "untied")
    rewrite_config(tmp_path / "hf", **changes)
    with pytest.raises(ExportError, match=message):
        import_t5(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_another_model_kind(tokenizer_dir):
    with pytest.raises(ExportError, match=r"model.kind='transformer'"):
        t5_config(Config().model, load_tokenizer(tokenizer_dir / "tokenizer.json"))


# ----------------------------------------------------------------------------- masks, positions, the cache


@pytest.fixture(scope="module")
def t5(run):
    return model_of(run)


def test_relative_buckets_are_t5s():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = np.arange(-600, 600)
    for n_buckets, max_distance in [(32, 128), (8, 20), (16, 64), (64, 256)]:
        for bidirectional in (True, False):
            theirs = bucket(torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=n_buckets,
                            max_distance=max_distance).numpy()
            ours = relative_buckets(jnp.asarray(relative), bidirectional=bidirectional, n_buckets=n_buckets,
                                    max_distance=max_distance)
            np.testing.assert_array_equal(ours, theirs)


def test_packed_pairs_equal_each_pair_alone(t5):
    rng = np.random.default_rng(2)
    (in_a, in_b), (out_a, out_b) = random_rows(rng, [7, 5]), random_rows(rng, [4, 6])
    alone = [logits(*t5, *padded([i], 16), *padded([o], 12))[0, :len(o)] for i, o in ((in_a, out_a), (in_b, out_b))]
    # Pair 1 then pair 2 in one row, positions restarting at each; the second row holds pair 2 alone.
    inputs = np.zeros((2, 16), np.int32)
    inputs[0, :12], inputs[1, :5] = in_a + in_b, in_b
    input_segments = np.zeros((2, 16), np.int32)
    input_segments[0, :12], input_segments[1, :5] = [1] * 7 + [2] * 5, 1
    input_positions = np.zeros((2, 16), np.int32)
    input_positions[0, :12], input_positions[1, :5] = [*range(7), *range(5)], range(5)
    targets = np.zeros((2, 12), np.int32)
    targets[0, :10], targets[1, :6] = out_a + out_b, out_b
    target_segments = np.zeros((2, 12), np.int32)
    target_segments[0, :10], target_segments[1, :6] = [1] * 4 + [2] * 6, 1
    target_positions = np.zeros((2, 12), np.int32)
    target_positions[0, :10], target_positions[1, :6] = [*range(4), *range(6)], range(6)
    packed = logits(*t5, inputs, input_segments, targets, target_segments, input_positions, target_positions)
    np.testing.assert_allclose(packed[0, :4], alone[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(packed[0, 4:10], alone[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(packed[1, :6], alone[1], rtol=0, atol=1e-5)


def test_the_decoder_never_sees_the_future_nor_another_pairs_input(t5):
    rng = np.random.default_rng(3)
    inputs, targets = np.asarray(random_rows(rng, [12])), np.asarray(random_rows(rng, [9]))
    input_segments = np.asarray([[1] * 6 + [2] * 6])
    target_segments = np.asarray([[1] * 4 + [2] * 5])
    base = logits(*t5, inputs, input_segments, targets, target_segments)
    for t in range(1, 9):
        changed = targets.copy()
        changed[0, t] = (changed[0, t] + 1) % MODEL["vocab_size"]
        after = logits(*t5, inputs, input_segments, changed, target_segments)
        np.testing.assert_allclose(after[0, :t], base[0, :t], rtol=0, atol=1e-6)
        assert not np.allclose(after[0, t], base[0, t])  # the changed token itself does count
    other_input = inputs.copy()
    other_input[0, 6:] = random_rows(rng, [6])[0]  # pair 2's input: pair 1's target must not notice
    after = logits(*t5, other_input, input_segments, targets, target_segments)
    np.testing.assert_allclose(after[0, :4], base[0, :4], rtol=0, atol=1e-6)
    assert not np.allclose(after[0, 4:], base[0, 4:])


def test_padding_rows_stay_finite_and_give_finite_gradients(t5):
    graphdef, params = t5
    inputs, input_segments = padded([[20] * 16, [], [30] * 3], 16)
    targets, target_segments = padded([[], [40] * 4, [50] * 8], 8)

    def loss(params):
        out = nnx.merge(graphdef, params)(inputs, input_segments, targets, target_segments)
        return jnp.sum(out * target_segments[..., None]), out

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_the_token_loop_copies_no_cache_and_no_weights(t5):
    """As the LM's decoder: per token only the new rows of each layer's cache move; the encoder's keys and
    values and the weights are sliced once, before the loop."""
    graphdef, params = t5
    cfg = EncoderDecoderConfig(**MODEL)
    b, width, new_tokens = 3, 16, 5
    heads = (b, cfg.n_heads)
    shapes = [(*heads, new_tokens, cfg.resolved_head_dim), (*heads, width, cfg.resolved_head_dim),
              *{leaf.shape[1:] for leaf in jax.tree.leaves(params) if leaf.ndim == 3}]
    text = _generate.lower(graphdef, params, jnp.ones((b, width), jnp.int32), jnp.ones((b, width), jnp.int32),
                           jnp.int32(1), jax.random.PRNGKey(0), new_tokens, Sampling(temperature=0),
                           Vocabulary(eos_id=2, size=cfg.vocab_size)).compile().as_text()
    assert not copies_in_token_loop(text, shapes)


def test_kv_cache_decoding_equals_teacher_forcing(t5):
    graphdef, params = t5
    rng = np.random.default_rng(4)
    inputs, input_segments = padded(random_rows(rng, [11, 5, 16]), 16)
    targets = np.asarray(random_rows(rng, [9, 9, 9]))

    @jax.jit
    def both(params):
        model = nnx.merge(graphdef, params)
        encoded = model.encode(inputs, input_segments)
        forced = model.decode(targets, np.ones_like(targets), encoded, input_segments)
        cross = model.cross_kv(encoded)

        def step(cache, t):
            token_B1 = jax.lax.dynamic_slice_in_dim(targets, t, 1, axis=1)
            logits_B1V, cache = model.decode_step(token_B1, t, cache, cross, input_segments)
            return cache, logits_B1V[:, 0]

        _, stepped_TBV = jax.lax.scan(step, model.init_cache(3, targets.shape[1]), jnp.arange(targets.shape[1]))
        return forced, stepped_TBV.transpose(1, 0, 2)

    forced, stepped = both(params)
    print(f"max |cached - teacher-forced| logits: {np.abs(forced - stepped).max():.2e}")
    np.testing.assert_allclose(stepped, forced, rtol=0, atol=1e-5)


def test_sharded_forward_equals_one_device(t5, devices):
    """fsdp (4) x tensor (2) shardings on 8 devices, against the same weights on one device."""
    graphdef, params = t5
    cfg = Config(model=MODEL, sharding={"preset": "fsdp_tp"}, mesh={"data": 1, "fsdp": 4, "tensor": 2})
    mesh, rules = make_mesh(cfg.mesh, devices), resolve_rules("fsdp_tp", {})
    layout = plan_models(make_task(cfg), mesh, rules, cfg.train.seed)
    params = jax.device_get(params)
    sharded_params = jax.device_put(params, layout.shardings[MAIN_GROUP])
    assert sharded_params["decoder"]["layers"]["cross_attn"]["wq"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    rng = np.random.default_rng(5)
    batch = (*padded(random_rows(rng, [16, 9, 3, 12]), 16), *padded(random_rows(rng, [8, 2, 5, 7]), 8))

    def forward(params, *batch):
        return nnx.merge(graphdef, params)(*batch)

    sharded = jax.jit(with_rules(forward, mesh, rules))(sharded_params, *batch)
    single = logits(graphdef, params, *batch)
    print(f"max |sharded - one device| logits: {np.abs(np.asarray(sharded) - single).max():.2e}")
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- sizes


def test_param_count_and_flops_per_token_match_the_model():
    # Layers unrolled: XLA counts a scanned loop's body once.
    cfg = Config(model={**MODEL, "d_model": 128, "d_ff": 256, "vocab_size": 512, "scan_layers": False}).model
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5(cfg, nnx.Rngs(0))))
    assert sum(x.size for x in jax.tree.leaves(state)) == param_count(cfg)
    untied = Config(model={**MODEL, "tie_embeddings": True}).model
    assert param_count(Config(model=MODEL).model) - param_count(untied) == 32 * MODEL["vocab_size"]
    l, t = 64, 32
    tokens = lambda n: jax.ShapeDtypeStruct((1, n), jnp.int32)  # noqa: E731
    forward = jax.jit(lambda state, *batch: nnx.merge(graphdef, state)(*batch)).lower(
        state, tokens(l), tokens(l), tokens(t), tokens(t)).compile()
    # XLA's count of one forward pass also has the norms, softmaxes and activations.
    assert forward.cost_analysis()["flops"] == pytest.approx(flops_per_token(cfg, l, t) * (l + t) / 3, rel=0.1)
