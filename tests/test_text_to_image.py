"""Text-to-image latent diffusion: the caption path of the DiT, guidance with null and negative captions,
cached and on-the-fly latents, sharding, and the shipped config through the CLI (train, die, resume, sample
with prompts, evaluate prompt adherence against guidance)."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.config import Config, load_config
from jaxgen.data.caption_words import caption_ids, colliding_words
from jaxgen.data.pipeline import to_global
from jaxgen.data.synth_shapes import write_shapes_folder
from jaxgen.diffusion.guidance import guided
from jaxgen.errors import ConfigError
from jaxgen.metrics import read_metrics
from jaxgen.models.dit import DiT
from jaxgen.outputs.latent_dataset_writer import prepare_latent_dataset
from jaxgen.outputs.runs import save_imported_run
from jaxgen.sharding import make_mesh
from jaxgen.tasks import make_task
from jaxgen.tasks.diffusion import DiffusionTask
from jaxgen.tasks.layout import MAIN_GROUP, fresh_params, held_out_sums
from jaxgen.train.build import build_training

from helpers import run_jaxgen, saved_state

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "t2i_shapes.yaml"
# 16x16 RGB images -> 8x8x4 latents; the 32 px shapes folder is scaled down as training reads it.
AE = {"kind": "autoencoder", "image_size": 16, "channels": 3, "block_channels": (8, 16), "norm_groups": 4,
      "latent_channels": 4, "layers_per_block": 1}
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.freq_dim=32", "conditioning.joint_width=32",
        "conditioning.joint_layers=1", "conditioning.joint_heads=2", "data.batch_size=8", "train.eval_batches=2",
        "images.quality_images=16", "diffusion.sample_steps=3", "diffusion.samples_per_class=2",
        "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A captioned shapes folder, an autoencoder run of random weights and its cached latents."""
    root = tmp_path_factory.mktemp("t2i")
    write_shapes_folder(root / "shapes", 60, size=32, held_out_fraction=0.3)
    ae_cfg = Config(model=AE, images={"source": "folder", "folder": str(root / "shapes")})
    (root / "ae").mkdir()
    save_imported_run(root / "ae", ae_cfg, jax.jit(lambda: fresh_params(make_task(ae_cfg), 0))(),
                      "tests/test_text_to_image.py", inputs={})
    prepare_latent_dataset(f"folder:{root / 'shapes'}", root / "ae", root / "latents", progress=False)
    return root


def t2i_config(world, *overrides, cached=True):
    source = ([f"images.latents={world / 'latents'}"] if cached else
              ["images.source=folder", "images.latents=null", f"images.folder={world / 'shapes'}"])
    return load_config(CONFIG, [*TINY, f"diffusion.autoencoder={world / 'ae'}", *source, *overrides])


def randomized(params, seed=0, std=0.1):
    """Every parameter random: the zero-initialised gates and projections no longer hide the conditioning."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def caption(texts, cfg, keep=True):
    rows = [caption_ids(t, cfg.conditioning.joint_vocab, cfg.conditioning.max_length) for t in texts]
    return {"ids": jnp.asarray(np.stack([r[0] for r in rows])), "mask": jnp.asarray(np.stack([r[1] for r in rows])),
            "keep": jnp.full((len(texts),), keep)}


@pytest.fixture(scope="module")
def text_dit(world):
    cfg = t2i_config(world)
    model = DiT(cfg.model, nnx.Rngs(0), text=cfg.conditioning)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, randomized(nnx.to_pure_dict(state)))
    nnx.update(model, state)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    return cfg, model, x, jnp.array([300.0, 700.0])


def test_the_caption_changes_the_prediction_and_a_dropped_caption_is_the_null_caption(text_dit):
    cfg, model, x, t = text_dit
    a = ["a small red circle above a large blue square", "a large green cross"]
    b = ["a small red circle below a large blue square", "a large green ring"]
    out_a, out_b = model(x, t, caption(a, cfg)), model(x, t, caption(b, cfg))
    assert not np.allclose(out_a[0], out_b[0]) and not np.allclose(out_a[1], out_b[1])  # a relation, a kind
    dropped_a, dropped_b = model(x, t, caption(a, cfg, keep=False)), model(x, t, caption(b, cfg, keep=False))
    np.testing.assert_array_equal(dropped_a, dropped_b)  # whatever the caption, dropped is the null caption
    np.testing.assert_array_equal(model(x, t, caption(["", ""], cfg)), dropped_a)  # no words: the null caption too
    assert not np.allclose(dropped_a, out_a)


def test_guidance_at_scale_one_is_the_conditional_prediction_and_a_negative_prompt_replaces_the_null(text_dit):
    cfg, model, x, t = text_dit
    cond = caption(["a small red circle", "a large blue square above a small white ring"], cfg)
    null = caption(["", ""], cfg, keep=False)
    negative = caption(["a large yellow triangle", "a small green cross"], cfg)
    np.testing.assert_allclose(guided(model, 1.0, 4)(x, t, cond, null), model(x, t, cond), atol=1e-5)
    pushed = guided(model, 4.0, 4)(x, t, cond, negative)
    expected = model(x, t, negative) + 4.0 * (model(x, t, cond) - model(x, t, negative))
    np.testing.assert_allclose(pushed, expected, atol=1e-4)


def test_caption_words_are_hashed_padded_and_collisions_reported():
    ids, mask = caption_ids("A small RED circle, above!", 4096, 8)
    assert mask.tolist() == [True] * 5 + [False] * 3 and ids[5:].tolist() == [0, 0, 0]
    assert caption_ids("a small red circle above", 4096, 8)[0].tolist() == ids.tolist()  # case and punctuation
    assert caption_ids("one two three", 4096, 2)[1].tolist() == [True, True]  # cut to max_length
    assert colliding_words(["alpha beta gamma delta"], 4096) == []
    many = [f"w{i}" for i in range(200)]
    assert colliding_words([" ".join(many)], 64)  # 200 words into 63 buckets must collide


def test_cached_and_on_the_fly_latents_give_the_same_loss(world):
    losses = []
    for cached in (True, False):
        cfg = t2i_config(world, "mesh.data=1", cached=cached)
        training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        data = training.task.make_data(world)
        state = training.init_state()
        batches = [to_global(b, training.mesh) for b in data.eval]
        assert batches[0]["images"].shape[1:] == ((8, 8, 4) if cached else (16, 16, 3))
        losses.append(held_out_sums(training.eval_step, state.params, batches))
        scale = float(state.params["autoencoder"]["scale"])
        losses[-1] = (*losses[-1], scale)
    (cached_loss, cached_w, cached_scale), (fly_loss, fly_w, fly_scale) = losses
    assert cached_scale == pytest.approx(fly_scale, rel=1e-5) and cached_scale != 1.0
    assert cached_w == fly_w and cached_loss == pytest.approx(fly_loss, rel=1e-5)


def test_evaluations_over_guidance_scales_decode_the_real_latents_once(world, monkeypatch):
    """The real images sample quality compares with (cached latents decoded through the frozen autoencoder) are
    made once, not once per guidance scale or per evaluation: a split of real data can be large."""
    cfg = t2i_config(world, "mesh.data=1", "diffusion.eval_guidance_scales=[1.0,3.0,5.0]")
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    task = training.task
    data = task.make_data(world)
    decoded = []
    pixel_set = task.latents.pixel_set
    monkeypatch.setattr(task.latents, "pixel_set", lambda w, s: decoded.append(len(s.images)) or pixel_set(w, s))
    weights = training.layout.models.weights(training.init_state().params)
    for _ in range(2):  # as at step 0 and at the end of a run
        result = task.evaluate(weights, data, 1.0, 1.0)
        assert [r["guidance_scale"] for r in result["guidance_sweep"]] == [1.0, 3.0, 5.0]
    assert decoded == [16, len(data.train_set.images)]  # the quality images and the train split, each once


def test_a_latent_dataset_of_another_autoencoder_is_refused(world, tmp_path):
    ae_cfg = load_config(world / "ae" / "config.yaml")
    (tmp_path / "other").mkdir()
    save_imported_run(tmp_path / "other", ae_cfg, jax.jit(lambda: fresh_params(make_task(ae_cfg), 1))(),
                      "tests/test_text_to_image.py", inputs={})
    cfg = t2i_config(world, f"diffusion.autoencoder={tmp_path / 'other'}")
    with pytest.raises(ConfigError, match="was encoded by the autoencoder of .*prepare the latents again"):
        DiffusionTask(cfg).make_data(tmp_path)


def test_latents_prepared_again_by_a_newer_autoencoder_are_not_decoded_by_the_one_the_run_froze(world, tmp_path):
    """A run froze the autoencoder that wrote its latents; latents of the autoencoder run's newer checkpoint
    (here: another one's) are refused where they are decoded, not decoded by the wrong autoencoder."""
    cfg = t2i_config(world, "mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    task = training.task
    task.make_data(world)
    weights = training.layout.models.weights(training.init_state().params)
    latents = np.zeros((2, 8, 8, 4), np.float32)
    assert task.latents.decode(weights, latents).shape == (2, 16, 16, 3)
    ae_cfg = load_config(world / "ae" / "config.yaml")
    (tmp_path / "newer").mkdir()
    save_imported_run(tmp_path / "newer", ae_cfg, jax.jit(lambda: fresh_params(make_task(ae_cfg), 1))(),
                      "tests/test_text_to_image.py", inputs={})
    task.latents.manifest = prepare_latent_dataset(f"folder:{world / 'shapes'}", tmp_path / "newer",
                                                   tmp_path / "latents", progress=False)
    with pytest.raises(ConfigError, match=r"was encoded by the autoencoder of .*newer \(step 0\), not by the one "
                                          r"this run froze .*start a new run$") as refused:
        task.latents.decode(weights, latents)
    assert "\n" not in str(refused.value)


def text_batches(cfg, n):
    rng = np.random.default_rng(0)
    b, m = cfg.data.batch_size, cfg.model
    out = []
    for _ in range(n):
        texts = [f"a small red circle {'above' if rng.random() < 0.5 else 'below'} a large blue square"
                 for _ in range(b)]
        rows = [caption_ids(t, cfg.conditioning.joint_vocab, cfg.conditioning.max_length) for t in texts]
        out.append({"images": rng.standard_normal((b, m.image_size, m.image_size, m.channels)).astype(np.float32),
                    "labels": np.zeros(b, np.int32), "caption_ids": np.stack([r[0] for r in rows]),
                    "caption_mask": np.stack([r[1] for r in rows])})
    return out


def test_sharded_text_to_image_steps_equal_one_device(world, devices):
    results = []
    for mesh in (["mesh.data=1"], ["sharding.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]):
        cfg = t2i_config(world, *mesh, "optimizer.eps=1e-3")
        training = build_training(cfg, make_mesh(cfg.mesh, devices[:1] if len(mesh) == 1 else devices))
        training.task.latents.scale = 1.0
        state, losses = training.init_state(), []
        for batch in text_batches(cfg, 3):
            state, metrics = training.train_step(state, to_global(batch, training.mesh))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params[MAIN_GROUP])))
    (ref_losses, ref_params), (losses, params) = results
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, ref_params)


# ----------------------------------------------------------------------------- through the CLI


def losses(run_dir):
    return [{k: v for k, v in r.items() if k in ("step", "loss", "grad_norm")}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def cli_runs(world):
    """The shipped config, shrunk: straight through, and killed right after its step-4 checkpoint then resumed."""
    args = ["--config", str(CONFIG), *TINY, f"diffusion.autoencoder={world / 'ae'}",
            f"images.latents={world / 'latents'}", "train.steps=8", "checkpoint.every=4", "train.eval_every=8",
            "diffusion.sample_every=0", "logging.every=1", "diffusion.eval_guidance_scales=[1.0,3.0]"]
    straight, crashed = world / "straight", world / "crashed"
    done = run_jaxgen("train", "--run-dir", str(straight), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    died = run_jaxgen("train", "--run-dir", str(crashed), *args, crash=("after-commit", 4), timeout=600)
    assert died.returncode == 137, died.stderr[-3000:]
    resumed = run_jaxgen("train", "--run-dir", str(crashed), *args)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    return straight, crashed, json.loads((straight / "summary.json").read_text())


def test_a_killed_text_to_image_run_resumes_bit_identically(cli_runs):
    straight, crashed, _ = cli_runs
    assert losses(crashed)[-4:] == losses(straight)[-4:]
    jax.tree.map(np.testing.assert_array_equal, saved_state(crashed, 8), saved_state(straight, 8))


def test_training_ends_with_prompt_adherence_beside_shuffled_prompts(cli_runs):
    straight, _, summary = cli_runs
    adherence = summary["adherence"]
    assert set(adherence) >= {"kind", "colour", "size", "relation", "prompt", "chance"}
    assert 0 <= adherence["chance"]["prompt"] <= 1 and adherence["images"] == 16
    assert {"frechet_distance", "frechet_floor"} <= set(summary)
    assert (straight / "samples" / "final.png").is_file()


def test_sample_draws_a_row_per_prompt_with_a_negative_prompt(cli_runs, tmp_path):
    straight, _, _ = cli_runs
    out = run_jaxgen("sample", "--run-dir", str(straight), "--prompt", "a small red circle above a large blue square",
                 "--prompt", "a large green cross", "--negative-prompt", "a small white ring", "--num", "3",
                 "--guidance", "4", "--out", str(tmp_path / "grid.png"), "--save-array", str(tmp_path / "x.npz"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["prompts"][1] == "a large green cross" and record["negative_prompt"] == "a small white ring"
    arrays = np.load(tmp_path / "x.npz")
    assert arrays["images"].shape == (6, 16, 16, 3) and arrays["prompts"].tolist()[2:4] == [
        "a small red circle above a large blue square", "a large green cross"]
    refused = run_jaxgen("sample", "--run-dir", str(straight), "--labels", "0,1")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "--labels cannot be used" in refused.stderr and "--negative-prompt" in refused.stderr


def test_eval_scores_adherence_at_each_guidance_scale_and_plots_it(cli_runs):
    straight, _, _ = cli_runs
    out = run_jaxgen("eval", "--run-dir", str(straight))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["guidance_scale"] for r in result["guidance_sweep"]] == [1.0, 3.0]
    assert all("adherence" in r and "chance" in r["adherence"] for r in result["guidance_sweep"])
    assert pathlib.Path(result["guidance_plot"]).is_file()
    scales = re.findall(r"sample quality at guidance scale ([\d.]+):", out.stderr)  # each line names its scale
    assert sorted(map(float, scales)) == sorted({result["guidance_scale"], 1.0, 3.0})
    logged = [r["eval_loss"] for r in read_metrics(straight / "metrics.jsonl") if "eval_loss" in r and r["step"] == 8]
    assert logged and result["eval_loss"] == pytest.approx(logged[-1], rel=1e-4)  # the loop's own held-out loss


def encoder_run(run: pathlib.Path, tokenizer) -> pathlib.Path:
    """A tiny BERT-style encoder run of random weights, with `tokenizer`."""
    from jaxgen.data.tokenizer import keep_tokenizer

    encoder_cfg = Config(model={"kind": "encoder", "vocab_size": 512, "d_model": 24, "n_layers": 1, "n_heads": 2,
                                "d_ff": 48})
    run.mkdir()
    save_imported_run(run, encoder_cfg, jax.jit(lambda: fresh_params(make_task(encoder_cfg), 3))(),
                      "tests/test_text_to_image.py", inputs={})
    keep_tokenizer(tokenizer, run)
    return run


def test_a_frozen_encoder_run_embeds_the_captions_and_stays_frozen(world, tokenizer, tmp_path, monkeypatch):
    from jaxgen.outputs.text_encoder import load_text_encoder

    run = encoder_run(tmp_path / "bert", tokenizer)
    cfg = t2i_config(world, f"conditioning.text_encoder={run}", "mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    task = training.task
    data = task.make_data(tmp_path)
    state = training.init_state()
    assert "text_encoder" in state.params and "text_encoder" not in state.opt_state  # frozen: no optimizer
    loaded = jax.device_get(load_text_encoder(run, max_length=cfg.conditioning.max_length).params)
    start = jax.device_get(state.params["text_encoder"])
    jax.tree.map(np.testing.assert_array_equal, start, loaded)
    for _ in range(2):
        state, metrics = training.train_step(state, to_global(next(data.train), training.mesh))
        assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["text_encoder"]), loaded)
    # Prompts at sampling time are embedded by the same frozen encoder, with the same tokenizer.
    texts = ["a small red circle above a large blue square", "a large green cross"]
    weights = training.layout.models.weights(state.params)
    condition = task.conditions.requested(weights, texts)
    encoder = load_text_encoder(run, max_length=cfg.conditioning.max_length)
    expected = encoder(texts)
    none = encoder([])  # no rows: empty arrays of the right shapes, not an error
    assert none.tokens.shape == (0, cfg.conditioning.max_length, 24) and none.pooled.shape == (0, 24)
    np.testing.assert_allclose(condition["tokens"], expected.tokens, atol=1e-5)
    np.testing.assert_allclose(condition["pooled"], expected.pooled, atol=1e-5)
    assert condition["tokens"].shape == (2, cfg.conditioning.max_length, 24)
    # Many prompts are embedded a fixed-size batch at a time (64, the last padded), each row as on its own.
    from jaxgen.outputs import text_encoder

    batches = []
    monkeypatch.setattr(text_encoder, "_embed_jit", lambda kind, graphdef, params, ids, mask: batches.append(len(ids))
                        or jax.jit(text_encoder.embed, static_argnums=(0, 1))(kind, graphdef, params, ids, mask))
    many = task.conditions.requested(weights, texts * 40)
    assert batches == [64, 64]
    assert many["tokens"].shape == (80, cfg.conditioning.max_length, 24)
    for key in ("tokens", "pooled"):
        np.testing.assert_allclose(many[key], np.tile(condition[key], (40,) + (1,) * (condition[key].ndim - 1)),
                                   atol=1e-5)


def test_a_resumed_run_checks_cached_latents_against_the_autoencoder_it_froze_not_the_newest(cli_runs, world,
                                                                                           tmp_path, monkeypatch):
    """Once the autoencoder run trained on, the correct continuation (latents of the step the run froze) was
    refused, and latents of the newer step were taken until they were first decoded: at the end of training."""
    from jaxgen.outputs import frozen_autoencoder

    straight, _, _ = cli_runs
    ae_cfg = load_config(world / "ae" / "config.yaml")
    (tmp_path / "newer").mkdir()  # the autoencoder run's newest checkpoint, since the DiT run froze step 0
    save_imported_run(tmp_path / "newer", ae_cfg, jax.jit(lambda: fresh_params(make_task(ae_cfg), 1))(),
                      "tests/test_text_to_image.py", inputs={})
    monkeypatch.setattr(frozen_autoencoder, "load_autoencoder", lambda *a, **k: pytest.fail("loaded the newest"))
    task = DiffusionTask(t2i_config(world, f"diffusion.autoencoder={tmp_path / 'newer'}"))
    frozen = task.inputs(task.make_data(straight))["autoencoder"]
    manifest = json.loads((world / "latents" / "latents.json").read_text())
    assert frozen == {**manifest["autoencoder"], "scale": manifest["scale"]}  # what the run's checkpoints record

    monkeypatch.undo()
    prepare_latent_dataset(f"folder:{world / 'shapes'}", tmp_path / "newer", tmp_path / "latents", progress=False)
    task = DiffusionTask(t2i_config(world, f"images.latents={tmp_path / 'latents'}"))
    with pytest.raises(ConfigError) as refused:
        task.make_data(straight)
    assert str(refused.value) == (
        f"images.latents='{tmp_path / 'latents'}' was encoded by the autoencoder of {tmp_path / 'newer'} (step 0), "
        f"not by the one this run froze in its checkpoints; prepare the latents again with it: jaxgen data prepare "
        f"--autoencoder {world / 'ae'} --step 0 --images ... --out ...")


def test_data_prepare_encodes_with_the_autoencoder_checkpoint_step_given(world, tmp_path):
    made = run_jaxgen("data", "prepare", "--images", f"folder:{world / 'shapes'}", "--autoencoder", str(world / "ae"),
                      "--step", "0", "--out", str(tmp_path / "latents"))
    assert made.returncode == 0, made.stderr[-3000:]
    assert json.loads((tmp_path / "latents" / "latents.json").read_text())["autoencoder"]["step"] == 0
    missing = run_jaxgen("data", "prepare", "--images", f"folder:{world / 'shapes'}", "--autoencoder",
                         str(world / "ae"), "--step", "3", "--out", str(tmp_path / "other"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"jaxgen: error: run directory '{world / 'ae'}' has no checkpoint for step 3; available: [0]"]
    assert not (tmp_path / "other").exists()
    text = run_jaxgen("data", "prepare", "--input", str(world / "shapes" / "train" / "metadata.jsonl"), "--step", "0",
                      "--out", str(tmp_path / "text"))
    assert text.returncode == 2 and "--step go with --images SOURCE" in text.stderr, text.stderr


def test_an_autoencoder_run_not_found_names_the_setting_and_where_a_relative_path_is_read_from(world, tmp_path,
                                                                                              monkeypatch):
    """`cd / && jaxgen sample --run-dir /abs/t2i` of a run trained with diffusion.autoencoder=vae said only
    `run directory 'vae' does not exist`."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        DiffusionTask(t2i_config(world, "diffusion.autoencoder=vae"))
    assert str(refused.value) == f"diffusion.autoencoder='vae' (from {tmp_path}): run directory 'vae' does not exist"


def test_a_run_opens_and_draws_the_same_where_its_autoencoders_run_has_moved(cli_runs, tmp_path):
    """The checkpoints hold the frozen autoencoder, but sample and eval read its settings from the autoencoder
    run, so a run whose autoencoder run was moved or deleted could no longer be opened: its work was lost."""
    import shutil

    import yaml

    straight, _, _ = cli_runs
    moved = tmp_path / "t2i"
    shutil.copytree(straight, moved)
    kept = yaml.safe_load((moved / "config.yaml").read_text())
    assert kept["diffusion"]["autoencoder_model"]["latent_channels"] == AE["latent_channels"]
    kept["diffusion"]["autoencoder"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(kept))
    drawn = {}
    for run in (straight, moved):
        out = run_jaxgen("sample", "--run-dir", str(run), "--prompt", "a large green cross", "--num", "2",
                         "--out", str(tmp_path / f"{run.name}.png"), "--save-array", str(tmp_path / f"{run.name}.npz"))
        assert out.returncode == 0, out.stderr[-3000:]
        drawn[run] = np.load(tmp_path / f"{run.name}.npz")["images"]
    np.testing.assert_array_equal(drawn[moved], drawn[straight])


def test_continuing_with_other_caption_settings_names_them_not_array_shapes(cli_runs):
    """A resume whose checkpoint does not fit listed the caption encoder's arrays where no model setting changed."""
    from jaxgen.train.run_dir import _other_model

    straight, _, _ = cli_runs
    cfg = load_config(straight / "config.yaml", ["conditioning.max_length=16"])
    assert _other_model(straight, cfg) == (
        f"run directory '{straight}' holds a model trained with other settings (conditioning.max_length: 12 -> 16); "
        f"continue it with its own (`jaxgen train --run-dir {straight}`, without the --config or overrides that "
        "change them) or train this config in a new --run-dir")


def test_a_run_with_a_frozen_text_encoder_opens_and_draws_the_same_once_that_encoders_run_has_moved(
        world, tokenizer, tmp_path):
    """Sample and eval loaded the frozen encoder's run (its newest checkpoint, config and tokenizer) to open a
    text-to-image run whose own checkpoints hold that encoder: once the run moved, the work could not be used."""
    bert = encoder_run(tmp_path / "bert", tokenizer)
    run = tmp_path / "t2i"
    trained = run_jaxgen("train", "--config", str(CONFIG), "--run-dir", str(run), *TINY, "train.steps=2",
                         f"diffusion.autoencoder={world / 'ae'}", f"images.latents={world / 'latents'}",
                         f"conditioning.text_encoder={bert}", "diffusion.quality_eval=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    kept = run / "text_encoder"  # the encoder run's settings and tokenizer; its parameters are in the checkpoints
    assert (kept / "config.yaml").is_file() and (kept / "tokenizer.model").read_bytes() == tokenizer.files()[
        "tokenizer.model"]
    drawn = []
    for moved in (False, True):
        if moved:
            bert.rename(tmp_path / "bert-elsewhere")
        out = run_jaxgen("sample", "--run-dir", str(run), "--prompt", "a large green cross", "--num", "2",
                         "--save-array", str(tmp_path / f"{moved}.npz"), "--out", str(tmp_path / f"{moved}.png"))
        assert out.returncode == 0, out.stderr[-3000:]
        drawn.append(np.load(tmp_path / f"{moved}.npz")["images"])
    np.testing.assert_array_equal(drawn[1], drawn[0])


def test_autoencoder_settings_kept_from_another_run_are_refused_by_a_new_run(world, tmp_path):
    cfg = t2i_config(world)
    kept = load_config(world / "ae" / "config.yaml").model.model_copy(update={"block_channels": (8, 8)})
    cfg = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"autoencoder_model": kept})})
    with pytest.raises(ConfigError, match=r"^diffusion.autoencoder_model holds other settings than diffusion.autoen"
                                          r"coder='.*' has; remove diffusion.autoencoder_model from the config"):
        DiffusionTask(cfg).make_data(tmp_path)


def test_a_prompt_longer_than_the_captions_the_model_reads_is_named(world, caplog):
    """A 100-word prompt was cut to conditioning.max_length=12 words without a word."""
    import logging

    from jaxgen.tasks.conditions import CaptionConditions

    conditions = CaptionConditions(t2i_config(world))
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        conditions.warn_of_prompts_read_in_part(["a small red circle", " ".join(["word"] * 100)])
    assert caplog.text.count("prompt") == 1
    assert "is 100 words long; the model reads only the first 12 (conditioning.max_length)" in caplog.text
    caplog.clear()
    # Letters the hashed-word encoder leaves out: `日本語 😀` drew for the empty caption, `café` for `caf`, silently.
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        conditions.warn_of_prompts_read_in_part(["日本語 😀 ¿¡", "a red café", "a small red circle!"])
    assert [r.getMessage() for r in caplog.records] == [
        "prompt '日本語 😀 ¿¡': the model's caption encoder reads only letters a-z and digits, so it is read as the "
        "empty caption (日本語 left out)",
        "prompt 'a red café': the model's caption encoder reads only letters a-z and digits, so it is read as "
        "'a red caf' (é left out)"]
