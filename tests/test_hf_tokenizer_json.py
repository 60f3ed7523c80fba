"""Hugging Face tokenizer.json tokenizers (Llama 3, Qwen, Mistral ship them): train, sample, eval, export, import.

The tokenizers are byte-level BPEs trained here with the `tokenizers` library on the
bundled corpus (nothing is downloaded), with the special tokens and configs of the
families: Llama 3's <|begin_of_text|>/<|end_of_text|>, Qwen's EOS-only <|endoftext|>.
"""

import itertools
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.lm import prepare_tokenizer
from jaxgen.data.tokenizer import load_tokenizer
from jaxgen.errors import ConfigError, DataError
from jaxgen.outputs.export import export_hf
from jaxgen.outputs.hf_import import import_hf
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.decode import Sampling, Vocabulary, sample_logits, without_padding
from jaxgen.tasks.layout import MAIN_GROUP

from conftest import TINY_CONFIG, tiny_config
from helpers import error_lines, run_jaxgen

tokenizers = pytest.importorskip("tokenizers")

TOKENIZER_SIZE = 384  # the model's vocab_size is larger in these runs: published models pad their embeddings
TEXTS = ["In the beginning God created the heaven and the earth.", "  two spaces, a tab\tand a newline\n",
         "accents: café, naïve; CJK: 日本語; emoji 🙂", "<|end_of_text|> and <|endoftext|> are text here", ""]


def byte_level_bpe(directory, special_tokens, config):
    """A byte-level BPE tokenizer.json (as Llama 3 and Qwen ship) and its tokenizer_config.json."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(itertools.islice(iter_documents([BUNDLED_CORPUS]), 3000), trainer)
    if config and config.get("bos_token"):  # Llama 3's tokenizer.json itself starts every sequence with BOS
        bos = config["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


LLAMA3 = (["<|begin_of_text|>", "<|end_of_text|>"],
          {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"})
QWEN = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}})


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    return byte_level_bpe(tmp_path_factory.mktemp("llama3_tok"), *LLAMA3)


# ----------------------------------------------------------------------------- the tokenizer itself


def test_encodes_decodes_and_counts_bytes_exactly(llama3_tokenizer):
    ours = load_tokenizer(llama3_tokenizer)
    theirs = tokenizers.Tokenizer.from_file(str(llama3_tokenizer))
    assert (ours.kind, ours.vocab_size, ours.bos_id, ours.eos_id) == ("hf_json", TOKENIZER_SIZE, 0, 1)
    lengths = ours.token_byte_lengths()
    for text, ids in zip(TEXTS, ours.encode(TEXTS)):
        assert ours.decode(ids) == text
        assert list(ours.encode_document(text)) == ids
        assert lengths[ids].sum() == len(text.encode("utf-8"))  # bits per byte counts true bytes
        if "<|" not in text:
            assert ids == theirs.encode(text, add_special_tokens=False).ids
    # Special-token text in a document stays text: data cannot forge a document boundary.
    assert ours.eos_id not in ours.encode(["<|end_of_text|>"])[0]
    assert lengths[[ours.bos_id, ours.eos_id]].tolist() == [0, 0]
    again = pickle.loads(pickle.dumps(ours))  # as grain workers receive it
    assert again.sha256 == ours.sha256 and again.encode(TEXTS) == ours.encode(TEXTS)


def test_special_tokens_come_from_the_config_or_the_usual_names(tmp_path):
    qwen = load_tokenizer(byte_level_bpe(tmp_path / "qwen", *QWEN))
    assert qwen.eos_id == qwen.bos_id == 0  # no BOS: documents are separated by EOS alone
    unnamed = load_tokenizer(byte_level_bpe(tmp_path / "no_config", LLAMA3[0], None))
    assert (unnamed.bos_id, unnamed.eos_id) == (0, 1)
    assert json.loads(unnamed.files()["tokenizer_config.json"]) == {"bos_token": "<|begin_of_text|>",
                                                                    "eos_token": "<|end_of_text|>"}


@pytest.mark.parametrize("special, config, says", [
    (["<unk>"], None, "has no tokenizer_config.json beside it and none of the usual eos_tokens"),
    (["<|x|>"], {"eos_token": "<|y|>"}, "names eos_token '<|y|>', which"),
    (["<|x|>"], {"bos_token": "<|x|>"}, "names no eos_token; jaxgen ends every document with it"),
    (["<|x|>"], ["eos_token"], "holds a JSON list, not an object"),
])
def test_a_tokenizer_without_usable_special_tokens_is_refused_in_one_line(tmp_path, special, config, says):
    path = byte_level_bpe(tmp_path, special, config if isinstance(config, dict) or config is None else {})
    if isinstance(config, list):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=says) as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


def test_the_model_may_have_more_logits_than_tokens_never_fewer(llama3_tokenizer, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    prepare_tokenizer(tiny_config(f"data.tokenizer={llama3_tokenizer}", "model.vocab_size=512"), tmp_path / "a")
    with pytest.raises(ConfigError, match=f"has {TOKENIZER_SIZE} tokens but model.vocab_size=256; set "
                                          f"model.vocab_size to at least {TOKENIZER_SIZE}"):
        prepare_tokenizer(tiny_config(f"data.tokenizer={llama3_tokenizer}", "model.vocab_size=256"), tmp_path / "b")
    assert not any((tmp_path / "b").iterdir())  # refused: nothing kept


def test_a_dataset_prepared_with_it_brings_it_to_the_run(llama3_tokenizer, tmp_path):
    from jaxgen.data.prepare import prepare_dataset

    (tmp_path / "corpus.txt").write_text("\n".join(itertools.islice(iter_documents([BUNDLED_CORPUS]), 400)) + "\n")
    ours = load_tokenizer(llama3_tokenizer)
    summary = prepare_dataset(str(tmp_path / "corpus.txt"), tmp_path / "ids", tokenizer=ours, progress=False,
                              validation_every_nth=10)
    assert summary["tokenizer"]["sha256"] == ours.sha256
    (tmp_path / "run").mkdir()
    kept = prepare_tokenizer(tiny_config(f"data.path={tmp_path / 'ids'}", "model.vocab_size=400"), tmp_path / "run")
    assert (kept.kind, kept.sha256) == ("hf_json", ours.sha256)
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == llama3_tokenizer.read_bytes()


def test_held_out_documents_are_counted_where_bos_is_eos_and_id_0(tmp_path):
    """Qwen's layout: documents start with EOS, here id 0, which is also what padding holds."""
    from jaxgen.data.lm import held_out_set
    from jaxgen.data.sources import held_out_documents

    qwen = load_tokenizer(byte_level_bpe(tmp_path, *QWEN))
    cfg = tiny_config(f"data.tokenizer={tmp_path / 'tokenizer.json'}", "model.vocab_size=400")
    held = held_out_set(cfg.data, qwen, max_batches=1000)
    assert held.whole and held.batches[-1]["weights"].min() == 0  # the padded last batch
    assert held.documents == len(list(held_out_documents(cfg.data)))


def test_decoding_never_samples_a_padded_id():
    """Ids past the tokenizer's are logits of a padded embedding; even when they are the largest, none is drawn."""
    logits = jnp.asarray([[0.0, 1.0, 0.5, 9.0, 9.0], [2.0, 0.0, 0.0, 0.0, 9.0]])
    vocabulary = Vocabulary(eos_id=1, size=3)
    keys = jax.random.split(jax.random.PRNGKey(0), 100)
    for sampling in (Sampling(temperature=0), Sampling(temperature=5.0), Sampling(temperature=1.0, top_k=2)):
        drawn = {int(t) for k in keys for t in sample_logits(without_padding(logits, vocabulary), k, sampling)}
        assert drawn and max(drawn) < 3
    assert without_padding(logits, Vocabulary(eos_id=1, size=5)) is logits  # nothing padded: untouched


# ----------------------------------------------------------------------------- a run, as a user makes it


@pytest.fixture(scope="module")
def hf_json_run(tmp_path_factory, llama3_tokenizer):
    run_dir = tmp_path_factory.mktemp("hf_json_run") / "run"
    result = run_jaxgen("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=12",
                        "train.eval_every=12", "train.sample_tokens=8", f"data.tokenizer={llama3_tokenizer}",
                        "model.vocab_size=400")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_a_run_keeps_its_tokenizer_json_and_samples_and_evaluates_with_it(hf_json_run, llama3_tokenizer):
    run_dir, trained = hf_json_run
    assert (run_dir / "tokenizer.json").read_bytes() == llama3_tokenizer.read_bytes()
    assert not (run_dir / "tokenizer.model").exists()
    assert "sample: " in trained.stdout
    sampled = run_jaxgen("sample", "--run-dir", str(run_dir), "--prompt", "And God said", "--max-new-tokens", "12")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.startswith("And God said") and len(sampled.stdout.strip()) > len("And God said")
    evaluated = run_jaxgen("eval", "--run-dir", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert 0 < report["bits_per_byte"] < 8 and report["eval_loss"] < np.log(TOKENIZER_SIZE)


def test_resuming_with_another_tokenizer_is_refused(hf_json_run, tmp_path):
    run_dir, _ = hf_json_run
    other = byte_level_bpe(tmp_path, *QWEN)
    result = run_jaxgen("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=14",
                        f"data.tokenizer={other}", "model.vocab_size=400")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [error] = error_lines(result.stderr)
    assert "differs from the tokenizer this run directory was trained with" in error


def test_export_tokenizes_and_computes_like_jaxgen_in_transformers(hf_json_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run_dir, _ = hf_json_run
    run = open_run(run_dir)
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    ours = load_tokenizer(run_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = [t for t in TEXTS if "<|" not in t]
    assert hf_tokenizer(texts)["input_ids"] == [[ours.bos_id, *ids] for ids in ours.encode(texts)]
    assert hf_tokenizer.batch_decode(ours.encode(texts)) == texts
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = np.asarray([[ours.bos_id, *ours.encode([TEXTS[0]])[0]]])
    theirs = hf_model(torch.tensor(tokens)).logits.detach().numpy()
    graphdef, params = run.weights.graphdefs[MAIN_GROUP], run.weights.params[MAIN_GROUP]
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens))), theirs, atol=1e-4)


def test_a_qwen_checkpoint_with_only_tokenizer_json_imports_fine_tunes_and_exports(tmp_path):
    """Qwen ships tokenizer.json (no BOS) and an embedding padded past its tokenizer; both survive the round trip."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf_dir = tmp_path / "qwen"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf_dir)
    byte_level_bpe(hf_dir, *QWEN)
    imported = import_hf(hf_dir, tmp_path / "imported")
    assert (imported / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert (imported / "tokenizer_config.json").read_bytes() == (hf_dir / "tokenizer_config.json").read_bytes()

    # An import holds parameters alone: continued, its restore listed the optimizer's state as missing arrays.
    continued = run_jaxgen("train", "--run-dir", str(imported), "train.steps=2")
    assert continued.returncode == 2 and continued.stderr.splitlines()[-1] == (
        f"jaxgen: error: run directory '{imported}' is an import of '{hf_dir}': parameters alone, with no training "
        f"state to continue; fine-tune them in a new run: jaxgen train --run-dir NEW --config {imported}/config.yaml "
        f"checkpoint.init_from={imported} data.tokenizer={imported}"), continued.stderr[-2000:]
    tuned = tmp_path / "tuned"
    result = run_jaxgen("train", "--config", str(imported / "config.yaml"), "--run-dir", str(tuned),
                        f"checkpoint.init_from={imported}", f"data.tokenizer={imported}", "train.steps=6",
                        "train.eval_every=6", "train.sample_tokens=8", "data.batch_size=8", "data.seq_len=32",
                        "logging.every=1", "optimizer.lr=1e-3", "optimizer.warmup_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tuned / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()

    run = open_run(tuned)
    out = export_hf(run, tmp_path / "out")
    # As it came in, plus what AutoTokenizer needs to load it without the original's Python class.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        **QWEN[1], "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64}
    texts = [t for t in TEXTS if "<|" not in t]
    ids = load_tokenizer(tuned).encode(texts)
    assert transformers.AutoTokenizer.from_pretrained(out)(texts)["input_ids"] == ids  # Qwen adds no BOS
    exported = json.loads((out / "config.json").read_text())
    assert (exported["model_type"], exported["vocab_size"], exported["eos_token_id"]) == ("qwen3", 512, 0)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = np.asarray([[0, *load_tokenizer(tuned).encode([TEXTS[0]])[0]]])
    theirs = hf_model(torch.tensor(tokens)).logits.detach().numpy()
    graphdef, params = run.weights.graphdefs[MAIN_GROUP], run.weights.params[MAIN_GROUP]
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
