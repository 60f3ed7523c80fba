"""After training: evaluate, generate, export to Hugging Face and import back."""

import contextlib
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from sentencepiece import sentencepiece_model_pb2

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.sentencepiece_tokenizer import BOS_ID, EOS_ID
from jaxgen.data.tokenizer import load_tokenizer
from jaxgen.errors import CheckpointError, ExportError
from jaxgen.metrics import read_metrics
from jaxgen.models import build_model
from jaxgen.outputs.evaluate import evaluate_run
from jaxgen.outputs.export import export_hf, export_run
from jaxgen.outputs.hf_import import import_hf
from jaxgen.outputs.hf_tokenizer import write_sentencepiece_as_hf
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.decode import Sampling, Vocabulary, _decode, generate, prompt_bucket, sample_logits

from conftest import REPO, TINY_CONFIG, tiny_config
from helpers import copies_in_token_loop, jaxgen_cli, run_jaxgen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = jaxgen_cli("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=10",
                        "train.eval_every=10", "train.sample_tokens=0", "model.n_kv_heads=2")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_eval_reproduces_the_loops_eval_loss(trained):
    result = jaxgen_cli("eval", "--run-dir", str(trained))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    logged = [r["eval_loss"] for r in read_metrics(trained / "metrics.jsonl") if r.get("step") == 10 and "eval_loss" in r]
    assert report["step"] == 10
    assert report["eval_loss"] == pytest.approx(logged[0], rel=1e-6)
    assert report["perplexity"] == pytest.approx(np.exp(report["eval_loss"]))
    assert 0 < report["bits_per_byte"] < report["eval_loss"] / np.log(2)  # a token is more than one byte
    assert json.loads((trained / "eval.jsonl").read_text().splitlines()[-1]) == report
    # On 3 devices, which the batch of 16 does not split over: the same held-out rows, padded with weight 0.
    on_three = run_jaxgen("eval", "--run-dir", str(trained), devices=3)
    assert on_three.returncode == 0, on_three.stderr[-2000:]
    three = json.loads(on_three.stdout.strip().splitlines()[-1])
    assert three["eval_tokens"] == report["eval_tokens"] and three["eval_loss"] == pytest.approx(logged[0], rel=1e-6)


@pytest.fixture(scope="module")
def hf_export(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    result = jaxgen_cli("export", "--run-dir", str(trained), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@contextlib.contextmanager
def transformers_messages():
    """Python warnings and transformers' logged warnings, as one list of strings."""
    handler = logging.Handler(logging.WARNING)
    messages = []
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        logger.removeHandler(handler)


def test_hf_export_loads_in_transformers_with_equal_logits(trained, hf_export):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_export, dtype=torch.float32)
    run = open_run(trained)
    model = run.weights.models()["model"]
    tokens = np.random.default_rng(0).integers(0, 512, (2, 48))
    ours = np.asarray(model(jnp.asarray(tokens)))
    theirs = hf_model(torch.tensor(tokens)).logits.detach().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# Spaces (repeated, leading, trailing), tabs, newlines, digits, punctuation, accents; CJK and
# emoji are not in the 512-piece vocabulary (byte fallback).
TEXTS = [
    "", " ", "  two leading spaces", " one leading space", "trailing spaces  ", "repeated   spaces  inside  ",
    "\ttab first\tand\ttabs\t", "one\nnewline", "two\n\nnewlines\n\n", "\n", "digits 1611 and 3.14159",
    "Punctuation: (a), [b]; c! d? 'e' \"f\" -- g...", "accents: café, naïve, Ünïcödé",
    "CJK: 中文字符 日本語", "emoji: 🙂🚀 end", "🙂 first",
]


def assert_tokenizes_like(hf_tokenizer, ours, texts):
    """Same ids with and without BOS, decoded back to the same text."""
    ids = ours.encode(texts)
    assert [ours.decode(i) for i in ids] == texts
    assert hf_tokenizer(texts, add_special_tokens=False)["input_ids"] == ids
    assert hf_tokenizer(texts)["input_ids"] == [[BOS_ID, *i] for i in ids]
    assert [hf_tokenizer.decode(i) for i in ids] == texts
    assert hf_tokenizer.batch_decode([[BOS_ID, *i] for i in ids], skip_special_tokens=True) == texts


def test_hf_tokenizer_tokenizes_and_decodes_like_jaxgen(trained, hf_export):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(trained / "tokenizer.model")
    for use_fast in (True, False):  # transformers 5 ignores use_fast: both load tokenizer.json
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_export, use_fast=use_fast)
        assert_tokenizes_like(hf_tokenizer, ours, [*TEXTS, "<s> and </s> are text to jaxgen"])


@pytest.mark.parametrize("settings", [
    {"model_type": "unigram"},  # the other model type `jaxgen tokenizer train` offers
    # A foreign model (data.tokenizer, jaxgen import): NFKC, no dummy prefix, pieces of spaces.
    {"normalization_rule_name": "nmt_nfkc", "add_dummy_prefix": False, "allow_whitespace_only_pieces": True},
])
def test_hf_tokenizer_follows_the_sentencepiece_settings(settings, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = {"vocab_size": 512, "model_type": "bpe", "normalization_rule_name": "identity", "byte_fallback": True,
            "remove_extra_whitespaces": False, "split_digits": True, "character_coverage": 1.0,
            "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "num_threads": 2, "minloglevel": 2, **settings}
    documents = itertools.islice(iter_documents([BUNDLED_CORPUS]), 1000)
    spm.SentencePieceTrainer.train(sentence_iterator=documents, model_prefix=str(tmp_path / "t"), **spec)
    write_sentencepiece_as_hf(tmp_path / "t.model", tmp_path, max_len=64)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    if settings.get("normalization_rule_name") == "nmt_nfkc":  # lossy: compare with sentencepiece's own decoding
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
        texts = [*TEXTS, "ﬁne ｆｕｌｌ①\u00a0nbsp"]
        ids = sp.encode(texts)
        assert hf_tokenizer(texts, add_special_tokens=False)["input_ids"] == ids
        assert [hf_tokenizer.decode(i) for i in ids] == sp.decode(ids)
    else:
        assert_tokenizes_like(hf_tokenizer, load_tokenizer(tmp_path / "t.model"), TEXTS)


def test_hf_generate_warns_nothing_and_pads_on_the_left(hf_export):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with transformers_messages() as messages:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_export, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_export)
        alone = model.generate(**tokenizer("And God said", return_tensors="pt"), max_new_tokens=5)
        prompts = ["And God said", "In the beginning God created the heaven"]
        together = model.generate(**tokenizer(prompts, padding=True, return_tensors="pt"), max_new_tokens=5)
    assert messages == []
    assert together[0, -5:].tolist() == alone[0, -5:].tolist()
    generation = json.loads((hf_export / "generation_config.json").read_text())
    assert generation == {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}


def test_sharded_bf16_export_and_import_round_trip(trained, tmp_path):
    from safetensors import safe_open

    run = open_run(trained)
    sharded = export_hf(run, tmp_path / "sharded", dtype="float32", max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    back = import_hf(sharded, tmp_path / "back")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.weights.params),
                 jax.device_get(open_run(back).weights.params))

    half = export_run(trained, tmp_path / "bf16", fmt="safetensors", dtype="bfloat16")
    with safe_open(half / "model.safetensors", framework="numpy") as f:
        assert "model/layers/attn/wq/kernel" in f.keys()
        assert f.get_slice("model/layers/attn/wq/kernel").get_dtype() == "BF16"
    assert (half / "config.yaml").exists()


@pytest.mark.parametrize("config, kind, formats", [
    ("bert_tiny.yaml", "encoder", "--format hf or --format safetensors"),
    ("t5_tiny.yaml", "encoder_decoder", "--format hf or --format safetensors"),
    ("dit_digits.yaml", "dit", "--format safetensors"),
])
def test_a_format_that_does_not_fit_names_those_that_do(tmp_path, config, kind, formats):
    """A BERT run was told '--format diffusers ...; use --format safetensors', although --format hf exports it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((REPO / "configs" / config).read_text())
    with pytest.raises(ExportError) as raised:
        export_run(run, tmp_path / "out", fmt="diffusers")
    assert str(raised.value) == (f"--format diffusers writes diffusers' AutoencoderKL, but model.kind={kind!r}; "
                                 f"use {formats}")
    assert not (tmp_path / "out").exists()


def test_export_and_import_errors_name_the_problem(trained, tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        export_run(tmp_path / "missing", tmp_path / "o1")
    with pytest.raises(Exception, match=r"no checkpoint for step 7; available: \[10\]"):
        export_run(trained, tmp_path / "o2", step=7)
    dit_run = tmp_path / "dit_run"
    dit_run.mkdir()
    (dit_run / "config.yaml").write_text((REPO / "configs" / "dit_digits.yaml").read_text())
    with pytest.raises(ExportError, match=r"model.kind='dit' has no Hugging Face Llama equivalent"):
        export_run(dit_run, tmp_path / "o3", fmt="hf")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match=r"\['GPT2LMHeadModel'\].*jaxgen imports LlamaForCausalLM"):
        import_hf(gpt2, tmp_path / "o4")
    biased = tmp_path / "biased"
    shutil.copytree(trained, biased / "x")
    (biased / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "attention_bias": True}))
    with pytest.raises(ExportError, match=r"attention_bias=True is not supported"):
        import_hf(biased, tmp_path / "o5")
    collapsing = tmp_path / "collapsing"  # a tokenizer that drops repeated spaces: refused before the restore
    collapsing.mkdir()
    shutil.copyfile(trained / "config.yaml", collapsing / "config.yaml")
    model = sentencepiece_model_pb2.ModelProto.FromString((trained / "tokenizer.model").read_bytes())
    model.normalizer_spec.remove_extra_whitespaces = True
    (collapsing / "tokenizer.model").write_bytes(model.SerializeToString())
    with pytest.raises(ExportError, match=r"tokenizer\.model' has remove_extra_whitespaces=True, which a Hugging Face"):
        export_run(collapsing, tmp_path / "o6", fmt="hf")
    assert not (tmp_path / "o6").exists()


def test_a_run_whose_tokenizer_was_changed_since_training_is_refused_by_every_reader(trained, tmp_path):
    """A tokenizer that still parses but is not the one trained with made sample, eval and export use other tokens
    than the model learnt, silently (resuming training refused it)."""
    changed = tmp_path / "changed"
    shutil.copytree(trained, changed)
    model = sentencepiece_model_pb2.ModelProto.FromString((changed / "tokenizer.model").read_bytes())
    model.pieces[300].score += 5.0
    (changed / "tokenizer.model").write_bytes(model.SerializeToString())
    with pytest.raises(CheckpointError, match=(
            r"'\S+/changed/tokenizer.model' is not the tokenizer checkpoint 10 was trained with \(its sha256 "
            r"\w{16}\.\.\., the checkpoint's \w{16}\.\.\.\): it was damaged or replaced; put the run's own "
            r"tokenizer back \(the run took it from '\S+'\)")):
        open_run(changed)
    with pytest.raises(CheckpointError, match="is not the tokenizer checkpoint 10 was trained with"):
        export_run(changed, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    open_run(trained)  # the run's own still opens


def test_a_checkpoint_read_with_other_model_settings_than_it_was_trained_with_is_named(trained, tmp_path, caplog):
    """config.yaml edited by hand (or an older step of a run continued with another rope_theta) was read with
    the settings config.yaml holds, without a word."""
    edited = tmp_path / "edited"
    shutil.copytree(trained, edited)
    text = (edited / "config.yaml").read_text()
    (edited / "config.yaml").write_text(text.replace("rope_theta: 10000.0", "rope_theta: 500000.0"))
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        open_run(trained, overrides=["model.compute_dtype=bfloat16"])  # given on the command line: no surprise
        assert caplog.messages == []
        open_run(edited)
    assert caplog.messages == [f"checkpoint 10 was trained with other model settings than {edited}/config.yaml "
                               "holds: model.rope_theta: 10000.0 -> 500000.0"]


def test_a_result_scored_with_edited_model_settings_is_recorded_so_and_never_shown_for_the_checkpoint(trained,
                                                                                                        tmp_path):
    """A model setting edited in config.yaml: `eval` warned, scored with it, and recorded the result under the
    checkpoint's digest alone; `eval --all` then showed it as the checkpoint's own (and, before, the other way
    round: with config.yaml edited, the unedited result was shown from eval.jsonl, not scored)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "eval.jsonl").unlink(missing_ok=True)  # what other tests of the shared run scored
    config = run_dir / "config.yaml"
    text = config.read_text()
    [own] = evaluate_run(run_dir, all_steps=True)
    assert "config_edits" not in own
    config.write_text(text.replace("rope_theta: 10000.0", "rope_theta: 500000.0"))
    [edited] = evaluate_run(run_dir, all_steps=True)
    assert edited["config_edits"] == ["model.rope_theta: 10000.0 -> 500000.0"]
    assert edited["checkpoint"] == own["checkpoint"] and edited["eval_loss"] != own["eval_loss"]
    assert evaluate_run(run_dir, all_steps=True) == [edited]  # shown from eval.jsonl while the edit stands
    config.write_text(text)
    assert evaluate_run(run_dir, all_steps=True) == [own]
    assert len(list(read_metrics(run_dir / "eval.jsonl"))) == 2


def test_a_run_that_cannot_be_written_is_scored_and_shown_not_recorded(trained, tmp_path, monkeypatch, caplog):
    """A colleague's run, or one on a read-only file system: `eval` scored it and showed the figures, then failed
    (exit 1) on eval.jsonl, and `--all` stopped after the first checkpoint it scored."""
    import errno
    import tempfile

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "eval.jsonl").unlink(missing_ok=True)  # what other tests of the shared run scored
    trial_file = tempfile.TemporaryFile

    def read_only_run_dir(*args, dir=None, **kwargs):
        if dir is not None and pathlib.Path(dir) == run_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return trial_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_run_dir)
    shown = []
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        results = evaluate_run(run_dir, all_steps=True, on_result=shown.append)
    assert results == shown and len(results) == len(list((run_dir / "checkpoints").glob("[0-9]*")))
    assert f"run directory {run_dir} cannot be written (read-only file system): results are shown, not recorded " \
           "in its eval.jsonl" in caplog.text
    assert not (run_dir / "eval.jsonl").exists()  # this file system takes it: only the check made it read-only


def test_images_with_no_place_to_go_are_refused_before_the_model_is_read(tmp_path):
    from jaxgen.errors import UsageError
    from jaxgen.outputs.sample import check_samples_folder

    check_samples_folder(tmp_path / "samples")  # made when the first image is written
    (tmp_path / "samples").write_text("not a folder")
    with pytest.raises(UsageError, match=r"^images go to the run's samples folder without --out, but '.*samples' "
                                         r"is a file; give a directory; give --out a path you can write$"):
        check_samples_folder(tmp_path / "samples")


def test_kv_cache_generation_equals_full_recomputation():
    cfg = tiny_config()
    model = build_model(cfg.model, nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    prompts = [[1, 5, 9, 33, 100, 7], [1, 77], [1, 300, 12, 40]]
    cached = generate(graphdef, nnx.to_pure_dict(params), prompts, 10, Vocabulary(EOS_ID, cfg.model.vocab_size),
                      Sampling(temperature=0))

    # Causal, so the logits at t of a zero-padded fixed buffer are those of the prefix: one compile.
    forward = jax.jit(lambda tokens: model(tokens))
    for prompt, got in zip(prompts, cached):
        tokens = list(prompt)
        for _ in range(10):
            buffer = np.zeros((1, 16), np.int32)
            buffer[0, : len(tokens)] = tokens
            tokens.append(int(jnp.argmax(forward(jnp.asarray(buffer))[0, len(tokens) - 1])))
        expected = tokens[len(prompt):]
        assert got == (expected[: expected.index(2)] if 2 in expected else expected)



def test_streamed_tokens_are_the_returned_ones_one_call_per_token():
    cfg = tiny_config()
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(3)))
    calls = []
    got = generate(graphdef, nnx.to_pure_dict(params), [[1, 5, 9], [1, 77]], 6,
                   Vocabulary(-1, cfg.model.vocab_size), Sampling(temperature=0),
                   on_token=lambda i, tokens_B, done_B: calls.append((int(i), np.asarray(tokens_B).tolist())))
    assert [i for i, _ in calls] == list(range(6))
    assert [[tokens[row] for _, tokens in calls] for row in range(2)] == got


def test_n_new_tokens_take_the_prefill_and_n_minus_one_steps(monkeypatch):
    """No step computes a token past the last one asked for (a 1-token request is the prefill alone)."""
    from jaxgen.models.transformer import Transformer

    calls, plain = [], Transformer.decode

    def counted(self, *args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "decode", counted)
    cfg = tiny_config("model.n_layers=1")  # a model no other test decodes with: _decode traces afresh
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(3)))
    params, vocabulary = nnx.to_pure_dict(params), Vocabulary(-1, cfg.model.vocab_size)
    for new_tokens in (1, 5):
        calls.clear()
        out = generate(graphdef, params, [[1, 5, 9]], new_tokens, vocabulary, Sampling(temperature=0))
        assert len(out[0]) == new_tokens and len(calls) == new_tokens

def test_prompts_of_lengths_in_one_bucket_share_one_compiled_decoder():
    cfg = tiny_config()
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(3)))
    params, vocabulary = nnx.to_pure_dict(params), Vocabulary(EOS_ID, cfg.model.vocab_size)
    assert [prompt_bucket(n) for n in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 64]
    generate(graphdef, params, [[1] * 17], 4, vocabulary, Sampling(temperature=0))
    compiled = _decode._cache_size()
    for length in (20, 25, 31, 32):
        generate(graphdef, params, [[1, *range(3, 2 + length)]], 4, vocabulary, Sampling(temperature=0))
    assert _decode._cache_size() == compiled


def test_the_token_loop_copies_no_cache_and_no_weights():
    """Per token, only the new rows move: no layer's cache is copied or transposed, no weight sliced."""
    cfg = tiny_config("model.n_kv_heads=2")
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(3)))
    params = nnx.to_pure_dict(params)
    b, width, new_tokens = 3, 16, 5
    m = cfg.model
    cache_shape = (b, m.n_kv_heads, width + new_tokens, m.resolved_head_dim)
    weight_shapes = {leaf.shape[1:] for leaf in jax.tree.leaves(params) if leaf.ndim == 3}
    text = _decode.lower(graphdef, params, jnp.ones((b, width), jnp.int32), jnp.zeros((b,), jnp.int32),
                         jax.random.PRNGKey(0), new_tokens, Sampling(temperature=0),
                         Vocabulary(EOS_ID, m.vocab_size), None).compile().as_text()
    assert not copies_in_token_loop(text, [cache_shape, *weight_shapes])



def test_the_prefill_computes_the_logits_of_the_last_prompt_token_alone():
    """The output layer (a vocabulary-wide GEMM) runs on one row per prompt, not on every prompt token."""
    cfg = tiny_config()
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(3)))
    params = nnx.to_pure_dict(params)
    b, width, vocab = 3, 16, cfg.model.vocab_size
    text = _decode.lower(graphdef, params, jnp.ones((b, width), jnp.int32), jnp.zeros((b,), jnp.int32),
                         jax.random.PRNGKey(0), 4, Sampling(temperature=0), Vocabulary(EOS_ID, vocab),
                         None).compile().as_text()
    every_token_logits = re.compile(rf"f32\[({b},{width}|{b * width}),{vocab}\]")
    assert not every_token_logits.search(text)
    assert re.search(rf"f32\[{b},{vocab}\]", text)  # the one row per prompt that is computed

def test_top_k_and_top_p_truncate_the_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    draw = lambda s: {int(sample_logits(logits, k, s)[0]) for k in keys}  # noqa: E731
    assert draw(Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert draw(Sampling(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draw(Sampling(temperature=1.0, top_p=0.01)) == {0}
    assert draw(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} .* must be"):
            Sampling(**bad)


def test_a_tiny_temperature_samples_the_greedy_token():
    """Logits over T overflowed to inf from T ~ 1e-38, and inf - inf gave NaN: nothing sensible was drawn."""
    logits = jnp.asarray([[1.0, 3.0, 2.5, -jnp.inf], [50.0, -20.0, 49.0, 0.0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 20)
    for sampling in (Sampling(temperature=1e-40), Sampling(temperature=1e-300), Sampling(temperature=1e-40, top_k=2),
                     Sampling(temperature=1e-40, top_p=0.5), Sampling(temperature=1e-40, top_k=3, top_p=0.9)):
        for dtype in (jnp.float32, jnp.bfloat16):
            drawn = {tuple(sample_logits(logits.astype(dtype), k, sampling).tolist()) for k in keys}
            assert drawn == {(1, 0)}, (sampling, dtype)


def test_cli_sample_is_greedy_and_deterministic(trained):
    args = ["sample", "--run-dir", str(trained), "--prompt", "And God said", "--temperature", "0",
            "--max-new-tokens", "12"]
    first, second = jaxgen_cli(*args), jaxgen_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout and first.stdout.startswith("And God said")
    to_the_end = jaxgen_cli(*args[:-1], "63")  # more than the 64-token context leaves after the prompt
    assert to_the_end.returncode == 0, to_the_end.stderr[-2000:]
    assert re.search(r"the longest prompt leaves room for \d+ new tokens in the model's context "
                     r"\(model.max_seq_len=64\), not the 63 asked for", to_the_end.stderr)
    assert "asked for" not in first.stderr
