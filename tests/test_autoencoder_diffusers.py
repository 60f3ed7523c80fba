"""The autoencoder is diffusers' AutoencoderKL: imported ones encode and decode as diffusers does, exports load in
diffusers, an import exports back bit for bit, and a sharded forward pass equals one device's."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from jaxgen.config import AutoencoderConfig, Config
from jaxgen.errors import ExportError
from jaxgen.models.autoencoder import AutoencoderKL, flops_per_image
from jaxgen.outputs.diffusers_vae import WEIGHTS_STEM, diffusers_config, export_diffusers, import_diffusers
from jaxgen.outputs.export import export_run
from jaxgen.outputs.runs import OpenedRun, open_run
from jaxgen.sharding import make_mesh, resolve_rules, with_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP, compile_eval_step, fresh_params, plan_models

from conftest import REPO
from helpers import jaxgen_cli

diffusers = pytest.importorskip("diffusers")

# RGB 16x16 images, two levels: every kind of tensor (shortcut, down- and upsampler, attention, quant convs).
RGB = {"kind": "autoencoder", "image_size": 16, "channels": 3, "block_channels": (8, 16), "norm_groups": 4,
       "latent_channels": 4, "layers_per_block": 2}
# One grey channel, three levels, neither quant convolutions nor mid-block attention (FLUX-style).
GREY = {"kind": "autoencoder", "image_size": 8, "channels": 1, "block_channels": (8, 8, 16), "norm_groups": 8,
        "latent_channels": 2, "quant_conv": False, "mid_attention": False, "shift_factor": 0.25}
WEIGHTS = f"{WEIGHTS_STEM}.safetensors"


def nchw(x_BHWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_BHWC.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def model_of(run: OpenedRun):
    return run.weights.models()[MAIN_GROUP]


def assert_same_vae(ours, theirs, images: np.ndarray, atol: float = 1e-4) -> None:
    """Posterior means, log-variances and decodings (of a random latent and of the mean) agree."""
    with torch.no_grad():
        posterior = theirs.encode(nchw(images)).latent_dist
        mean, logvar = nhwc(posterior.mean), nhwc(posterior.logvar)
        z = np.random.default_rng(1).standard_normal(mean.shape).astype(np.float32)
        decoded = nhwc(theirs.decode(nchw(z)).sample)
        reconstructed = nhwc(theirs(nchw(images)).sample)  # sample_posterior=False: decodes the mean
    outputs = nnx.jit(lambda model, x, z: (*model.encode(x), model.decode(z), model(x)[0]))(ours, images, z)
    for our, their in zip(outputs, (mean, logvar, decoded, reconstructed)):
        np.testing.assert_allclose(our, their, rtol=0, atol=atol)


def images(cfg: dict, n: int = 3) -> np.ndarray:
    s, c = cfg["image_size"], cfg["channels"]
    return np.random.default_rng(0).uniform(-1, 1, (n, s, s, c)).astype(np.float32)


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """A random diffusers AutoencoderKL with every GroupNorm and bias moved off its 1/0 init, saved as diffusers saves."""
    torch.manual_seed(0)
    config = {key: value for key, value in diffusers_config(AutoencoderConfig(**RGB)).items()
              if not key.startswith("_")}
    vae = diffusers.AutoencoderKL(**{**config, "scaling_factor": 0.5, "shift_factor": 0.1}).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    out = tmp_path_factory.mktemp("diffusers") / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    return vae, out


@pytest.fixture(scope="module")
def imported(theirs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("imported") / "run"
    result = jaxgen_cli("import", "--from", str(theirs[1]), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint.init_from={run_dir}" in result.stdout
    return run_dir


def test_imported_vae_encodes_and_decodes_as_diffusers(theirs, imported):
    run = open_run(imported)
    assert run.cfg.model.scaling_factor == 0.5 and run.cfg.model.shift_factor == 0.1
    assert set(run.weights.params) == {MAIN_GROUP}
    assert_same_vae(model_of(run), theirs[0], images(RGB))


def test_import_then_export_gives_the_same_files(theirs, imported, tmp_path):
    out = export_run(imported, tmp_path / "out", fmt="diffusers")
    original, exported = load_file(theirs[1] / WEIGHTS), load_file(out / WEIGHTS)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].tobytes() == tensor.tobytes(), name
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((theirs[1] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_diffusers_version"} == \
           {k: v for k, v in saved.items() if k != "_diffusers_version"}

    half = load_file(export_run(imported, tmp_path / "half", fmt="diffusers", dtype="bfloat16") / WEIGHTS)
    for name, tensor in original.items():
        assert half[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(half[name], tensor.astype(ml_dtypes.bfloat16))


def config(model: dict, image_dir, **sections) -> Config:
    """The model's config; the 16x16 RGB one reads a folder of images (no built-in source has that shape)."""
    images = {"source": "digits"} if model["image_size"] == 8 else {"source": "folder", "folder": str(image_dir)}
    return Config(model=model, images=images, **sections)


def own_run(cfg: Config, run_dir) -> OpenedRun:
    """A model born in jaxgen (its own initialisation), as export sees a run."""
    task, mesh, rules = make_task(cfg), make_mesh(cfg.mesh), resolve_rules(cfg.sharding.preset, {})
    layout = plan_models(task, mesh, rules, cfg.train.seed)
    return OpenedRun(run_dir=run_dir, cfg=cfg, task=task, mesh=mesh, layout=layout, step=0,
                     weights=layout.weights(jax.jit(lambda: fresh_params(task, cfg.train.seed))()),
                     eval_step=compile_eval_step(task, layout, mesh, rules))


def test_jaxgen_vae_exports_to_diffusers(tmp_path):
    run = own_run(config(GREY, tmp_path), tmp_path)
    out = export_diffusers(run, tmp_path / "vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(out).eval()
    assert theirs.config.shift_factor == 0.25 and not theirs.config.use_quant_conv
    assert_same_vae(model_of(run), theirs, images(GREY))


def test_decode_is_the_last_convolution_of_the_decoder_features(imported):
    @nnx.jit
    def check(model, x, z, rng):
        reconstruction, mean, logvar = model(x, rng)
        sampled = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return (model.decoder.conv_out(model.decoder_features(z)), model.decode(z),
                reconstruction, model.decode(sampled))

    z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    from_features, decoded, reconstruction, from_sample = check(model_of(open_run(imported)), images(RGB), z,
                                                                jax.random.PRNGKey(1))
    np.testing.assert_array_equal(from_features, decoded)
    np.testing.assert_allclose(reconstruction, from_sample, atol=1e-6)


def write_config(directory, **changes) -> None:
    directory.mkdir(exist_ok=True)
    config = {**diffusers_config(AutoencoderConfig(**RGB)), **changes}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"act_fn": "gelu"}, r"act_fn='gelu' is not supported by jaxgen's autoencoder \(only 'silu'\)"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     r"down_block_types=\['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'\] is not supported"),
    ({"out_channels": 1}, r"in_channels=3 and out_channels=1 differ"),
    ({"use_post_quant_conv": False}, r"use_quant_conv=True and use_post_quant_conv=False differ"),
    ({"latents_mean": [0.0] * 4}, r"latents_mean=\[0.0, 0.0, 0.0, 0.0\] is not supported"),
    ({"spatial_norm": True}, r"key 'spatial_norm' = True is an AutoencoderKL option"),
    ({"norm_num_groups": 3}, r"not divisible by model.norm_groups=3.*'norm_num_groups'"),
    ({"sample_size": [16, 16]}, r"key 'sample_size' = \[16, 16\]: Input should be a valid integer"),
])
def test_import_refuses_what_jaxgen_cannot_represent(changes, message, tmp_path):
    write_config(tmp_path / "vae", **changes)
    with pytest.raises(ExportError, match=message):
        import_diffusers(tmp_path / "vae", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_tensors_the_config_does_not_describe(theirs, tmp_path):
    write_config(tmp_path / "vae", layers_per_block=3)
    shutil.copyfile(theirs[1] / WEIGHTS, tmp_path / "vae" / WEIGHTS)
    with pytest.raises(ExportError, match=r"tensors that config.json implies are missing: decoder.up_blocks.0.resnets.3.conv1.bias"):
        import_diffusers(tmp_path / "vae", tmp_path / "out")


def test_each_format_refuses_the_other_family(imported, tmp_path):
    with pytest.raises(ExportError, match=r"model.kind='autoencoder' has no Hugging Face .* use --format diffusers"):
        export_run(imported, tmp_path / "o1", fmt="hf")
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.yaml").write_text((REPO / "configs" / "lm_tiny.yaml").read_text())
    with pytest.raises(ExportError, match=r"AutoencoderKL, but model.kind='transformer'; use --format hf"):
        export_run(lm, tmp_path / "o2", fmt="diffusers")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_sharded_forward_equals_one_device(imported):
    """The imported run read straight into fsdp x tensor shardings on 8 devices, against its weights on one device."""
    run = open_run(imported, overrides=["sharding.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    kernel = run.weights.params[MAIN_GROUP]["encoder"]["mid_block"]["resnets"][0]["conv1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
    x, rng = images(RGB, n=8), jax.random.PRNGKey(0)

    def forward(params, x):
        return run.layout.weights(params).models()[MAIN_GROUP](x, rng)

    rules = resolve_rules("fsdp_tp", {})
    sharded = jax.jit(with_rules(forward, run.mesh, rules))(run.weights.params, x)
    single = jax.jit(forward)(jax.device_get(run.weights.params), x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), sharded, single)


def test_flops_per_image_is_three_forward_passes_as_xla_counts_them():
    """XLA's count of one forward pass also has the norms and activations (a few percent at this size)."""
    cfg = AutoencoderConfig(**{**RGB, "image_size": 64, "layers_per_block": 1})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg, nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0]).lower(state, x).compile()
    assert forward.cost_analysis()["flops"] == pytest.approx(flops_per_image(cfg) / 3, rel=0.1)


def test_an_imported_vae_of_no_built_in_size_names_no_images_and_asks_for_some(imported):
    """Its import wrote the --from directory as images.folder, and `jaxgen eval` then said that folder holds no
    images in class sub-folders: a setting the user never made."""
    from jaxgen.data.images import open_images
    from jaxgen.errors import ConfigError
    from jaxgen.outputs.runs import load_run_config

    cfg = load_run_config(imported)
    assert cfg.images.source == "none" and cfg.images.folder is None
    with pytest.raises(ConfigError, match=r"^images.source=none: this run names no images of its 16x16x3 size; give "
                                          r"them with images.source=folder images.folder=DIR, "):
        open_images(cfg)
