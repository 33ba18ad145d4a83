"""Tests for the diffusion kinds of onlineaug.models: SD 1.x and SDXL pipelines by role, the load policy, LoRA and
textual inversion, and the availability checks that run before any producer starts.

Tiny random-weight pipelines only (32 px, one or two steps). Folders, LoRA files and embedding files are written
into tmp_path with the libraries' own writers (save_pretrained, save_lora_weights, torch.save / safetensors), so
the real from_pretrained, load_lora_weights and load_textual_inversion paths run offline.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from onlineaug.generators import GeneratorNotFoundError, full_random, save_tiny_pipeline
from onlineaug.generators.tiny import build_tiny_pipeline
from onlineaug.models import LoadPolicy, ModelRole, ModelSpec, describe_model, ensure_available, load_model
from onlineaug.models.diffusion import SCHEDULERS, make_scheduler

SIZE = 32
EXPECTED_CLASS = {
    ("instruct-pix2pix", "sd15"): StableDiffusionInstructPix2PixPipeline,
    ("img2img", "sd15"): StableDiffusionImg2ImgPipeline,
    ("text2img", "sd15"): StableDiffusionPipeline,
    ("inpaint", "sd15"): StableDiffusionInpaintPipeline,
    ("instruct-pix2pix", "sdxl"): StableDiffusionXLInstructPix2PixPipeline,
    ("img2img", "sdxl"): StableDiffusionXLImg2ImgPipeline,
    ("text2img", "sdxl"): StableDiffusionXLPipeline,
    ("inpaint", "sdxl"): StableDiffusionXLInpaintPipeline,
}
# 4 noisy latent channels, + 4 of the image to edit (InstructPix2Pix), + 1 mask + 4 masked image (inpainting)
IN_CHANNELS = {"instruct-pix2pix": 8, "img2img": 4, "text2img": 4, "inpaint": 9}
COSXL = {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0, "prediction_type": "v_prediction",
         "sigma_schedule": "exponential"}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------- helpers


def role(kind="img2img", arch="sd15", **options) -> ModelRole:
    return ModelRole(kind, "someorg/not-cached", architecture=arch, **options)


def load(kind="img2img", arch="sd15", spec="tiny", policy=LoadPolicy(), **options):
    return load_model(role(kind, arch, **options), ModelSpec.parse(spec, "edit"), device="cpu", policy=policy)


def run(pipe, kind, prompts=("a photo of a bird", "a photo of a car"), steps=1, seed=0, latent=False, guidance=4.0):
    """One pipeline call with per-sample generators; (n, 3, SIZE, SIZE) in [0, 1], or the final latents
    (n, 4, SIZE / 8, SIZE / 8) with ``latent=True`` (skips the VAE decoder: faster where the UNet or the text
    encoder is under test)."""
    n = len(prompts)
    kwargs = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                  output_type="latent" if latent else "pt",
                  generator=[torch.Generator().manual_seed(seed + i) for i in range(n)])
    image = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 100))
    if kind == "instruct-pix2pix":
        # SDXL's InstructPix2Pix resizes the image to height x width, default the UNet's native size (1024 px for
        # the real model), not the image's size as the SD 1.x pipeline does: always pass them
        kwargs.update(image=image, image_guidance_scale=1.5, height=SIZE, width=SIZE)
    elif kind == "img2img":
        kwargs.update(image=image, strength=1.0)
    elif kind == "inpaint":
        mask = torch.zeros(n, 1, SIZE, SIZE)
        mask[..., SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 1
        kwargs.update(image=image, mask_image=mask, strength=1.0, height=SIZE, width=SIZE)
    else:
        kwargs.update(height=SIZE, width=SIZE)
    return pipe(**kwargs).images


def digest(pipe) -> str:
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def token_row(pipe, token, which=""):
    tokenizer, encoder = getattr(pipe, f"tokenizer{which}"), getattr(pipe, f"text_encoder{which}")
    return encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny folders written by save_pretrained, built once per module: {(kind, arch): path}."""
    cache = {}

    def get(kind, arch):
        if (kind, arch) not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}-{arch}")
            cache[kind, arch] = save_tiny_pipeline(folder, task=kind, architecture=arch)
        return cache[kind, arch]

    return get


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("ONLINEAUG_ALLOW_DOWNLOAD", raising=False)
    return home


# ----------------------------------------------------------------------------- kinds x architectures


@pytest.mark.parametrize("kind, arch", list(EXPECTED_CLASS))
def test_every_kind_and_architecture_builds_its_pipeline_and_runs(kind, arch):
    pipe = load(kind, arch)
    assert type(pipe) is EXPECTED_CLASS[kind, arch]
    assert (pipe.kind, pipe.architecture) == (kind, arch)
    assert pipe.unet.config.in_channels == IN_CHANNELS[kind] and pipe.unet.config.out_channels == 4
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    if arch == "sdxl":
        assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
        config = pipe.unet.config
        assert config.addition_embed_type == "text_time"
        # cross-attention reads both encoders' hidden states side by side; the added embedding is the pooled
        # text embedding plus 6 size/crop numbers of addition_time_embed_dim sinusoidal features each
        assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + \
            pipe.text_encoder_2.config.hidden_size
        assert config.projection_class_embeddings_input_dim == \
            6 * config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
        assert pipe.vae.config.force_upcast is True
    else:
        assert pipe.safety_checker is None and getattr(pipe, "text_encoder_2", None) is None
    out = run(pipe, kind)
    assert out.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out[0], out[1])  # other prompt and noise, other image


def test_random_source_can_name_the_architecture():
    assert type(load("text2img", "sd15", spec="tiny-sdxl")) is StableDiffusionXLPipeline
    assert type(load("text2img", "sdxl", spec="tiny-sd15")) is StableDiffusionPipeline


@pytest.mark.parametrize("kind", ["text2img", "inpaint"])
def test_full_random_sdxl_has_the_released_sizes_on_meta(kind):
    """SDXL base 1.0's parameter counts; the inpainting UNet adds 5 input channels x 320 x 3 x 3."""
    pipe = full_random.build_full_random_pipeline(kind, device="meta", dtype=torch.float16, architecture="sdxl")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert type(pipe) is EXPECTED_CLASS[kind, "sdxl"] and pipe.unet.dtype == torch.float16
    assert count(pipe.unet) == 2_567_463_684 + (5 * 320 * 9 if kind == "inpaint" else 0)
    assert count(pipe.vae) == 83_653_863 and pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    assert count(pipe.text_encoder) == 123_060_480
    assert count(pipe.text_encoder_2) == 694_659_840
    config = pipe.unet.config
    assert config.cross_attention_dim == 768 + 1280 == 2048
    assert config.projection_class_embeddings_input_dim == 6 * 256 + 1280 == 2816
    assert torch.get_default_dtype() == torch.float32


# ----------------------------------------------------------------------------- real loading path


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_folder_round_trip_loads_the_same_weights(saved, arch):
    folder = saved("img2img", arch)
    other = "sdxl" if arch == "sd15" else "sd15"
    pipe = load("img2img", other, spec=folder)  # the folder's model_index.json wins over the role's architecture
    assert pipe.architecture == arch and type(pipe) is EXPECTED_CLASS["img2img", arch]
    assert pipe.unet.config._name_or_path.startswith(folder)
    in_process = load("img2img", arch)
    assert digest(pipe) == digest(in_process)
    assert torch.equal(run(pipe, "img2img"), run(in_process, "img2img"))


def test_fp16_variant_folder_is_loaded_with_its_variant(tmp_path):
    """A folder holding only *.fp16.safetensors (hf download --include '*.fp16.*') loads with variant='fp16'."""
    tiny = build_tiny_pipeline("text2img")
    exact = tiny.unet.conv_in.weight.clone()
    tiny.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    ensure_available("edit", role("text2img"), ModelSpec(str(tmp_path)))
    pipe = load("text2img", spec=str(tmp_path))
    assert pipe.unet.dtype == torch.float32  # the policy's dtype, from the fp16 files
    assert torch.equal(pipe.unet.conv_in.weight, exact.half().float())  # the fp16 values, upcast
    assert not torch.equal(pipe.unet.conv_in.weight, exact)


def test_hub_id_from_the_hf_cache(saved, empty_hf_home):
    repo = empty_hf_home / "hub" / "models--someorg--tiny-sdxl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(saved("text2img", "sdxl"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = ModelSpec("someorg/tiny-sdxl")
    ensure_available("generate", role("text2img", "sd15"), spec)
    pipe = load_model(role("text2img", "sd15"), spec, device="cpu")
    assert type(pipe) is StableDiffusionXLPipeline and digest(pipe) == digest(load("text2img", "sdxl"))
    assert "hub id someorg/tiny-sdxl" in describe_model(role("text2img"), spec)
    assert describe_model(role("text2img"), spec).endswith("cached)")


# ----------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_by_name(name):
    base = build_tiny_pipeline("img2img").scheduler
    scheduler = make_scheduler(base, name)
    expected = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
                "dpm++": DPMSolverMultistepScheduler, "pndm": PNDMScheduler, "edm_euler": EDMEulerScheduler}[name]
    assert type(scheduler) is expected
    if name == "dpm++":
        assert scheduler.config.algorithm_type == "dpmsolver++"  # DPM-Solver++, as Diff-Mix samples
    if name != "edm_euler":  # the SD noise schedule is carried over
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
        assert scheduler.config.beta_schedule == "scaled_linear"


def test_cosxl_edm_settings_land_in_the_scheduler_config_and_run():
    pipe = load("text2img", "sdxl", scheduler="edm_euler", scheduler_config=COSXL)
    assert type(pipe.scheduler) is EDMEulerScheduler
    assert {k: pipe.scheduler.config[k] for k in COSXL} == COSXL
    assert "beta_start" not in pipe.scheduler.config  # settings EDM does not take are not carried over
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas[:-1].double()
    # exponential schedule: log-sigma evenly spaced from sigma_max down to sigma_min
    assert torch.allclose(sigmas.log(), torch.linspace(torch.tensor(120.0).log(), torch.tensor(0.002).log(), 4,
                                                       dtype=torch.float64), atol=1e-5)
    out = run(pipe, "text2img", steps=2)
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_scheduler_config_without_a_name_overrides_the_stored_scheduler():
    pipe = load("img2img", scheduler_config={"timestep_spacing": "trailing"})
    assert type(pipe.scheduler) is PNDMScheduler and pipe.scheduler.config.timestep_spacing == "trailing"


def test_unknown_scheduler_settings_are_reported():
    bad = role("text2img", "sdxl", scheduler="edm_euler", scheduler_config={"sigma_mn": 0.1})
    with pytest.raises(ValueError, match=r"models\['edit'\]: scheduler_config keys \['sigma_mn'\].*EDMEuler.*sigma_min"):
        ensure_available("edit", bad, ModelSpec("tiny"))
    with pytest.raises(ValueError, match=r"\['sigma_mn'\] are not settings of EDMEulerScheduler"):
        load_model(bad, ModelSpec("tiny"), device="cpu")
    with pytest.raises(ValueError, match="unknown scheduler 'heun'.*euler_a"):
        ensure_available("edit", role(scheduler="heun"), ModelSpec("tiny"))


# ----------------------------------------------------------------------------- LoRA


def make_lora(folder, arch="sd15", seed=1, rank=4, text_encoder=False):
    """A random LoRA (A and B both random, alpha = rank) saved with the pipeline's save_lora_weights."""
    pipe = build_tiny_pipeline("img2img", architecture=arch)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=LORA_TARGETS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe.unet.add_adapter(config)
        layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
        if text_encoder:
            pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    type(pipe).save_lora_weights(str(folder), **layers)
    return os.path.join(folder, "pytorch_lora_weights.safetensors"), layers["unet_lora_layers"]


Q1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # one LoRA'd layer of the tiny UNet


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_changes_the_output_and_scale_zero_restores_it(tmp_path, arch):
    file, layers = make_lora(tmp_path, arch)
    base = load("text2img", arch)
    tuned = load("text2img", arch, spec={"source": "tiny", "lora": file})
    off = load("text2img", arch, spec={"source": "tiny", "lora": str(tmp_path), "lora_scale": 0.0})  # the folder
    assert tuned.lora_components == ("unet",)
    # fused, adapters removed: plain layers, ready for torch.compile
    assert not any(isinstance(m, BaseTunerLayer) for m in tuned.unet.modules())
    # W' = W + scale * (alpha / r) * B A, with alpha = r
    a, b = layers[f"{Q1}.lora_A.weight"], layers[f"{Q1}.lora_B.weight"]
    w0, w1 = base.unet.get_submodule(Q1).weight, tuned.unet.get_submodule(Q1).weight
    torch.testing.assert_close(w1, w0 + b @ a)
    assert torch.equal(off.unet.get_submodule(Q1).weight, w0)
    quick = dict(prompts=("a photo of a bird",), latent=True, guidance=1.0)
    out_base = run(base, "text2img", **quick)
    assert (run(tuned, "text2img", **quick) - out_base).abs().max() > 1e-3
    assert torch.equal(run(off, "text2img", **quick), out_base)


def test_lora_scale_and_text_encoder_weights(tmp_path):
    file, layers = make_lora(tmp_path, text_encoder=True)
    base = load("text2img")
    half = load("text2img", spec={"source": "tiny", "lora": file, "lora_scale": 0.5})
    assert set(half.lora_components) == {"unet", "text_encoder"}
    a, b = layers[f"{Q1}.lora_A.weight"], layers[f"{Q1}.lora_B.weight"]
    torch.testing.assert_close(half.unet.get_submodule(Q1).weight, base.unet.get_submodule(Q1).weight + 0.5 * b @ a)
    q = "encoder.layers.0.self_attn.q_proj"
    assert not torch.equal(half.text_encoder.get_submodule(q).weight, base.text_encoder.get_submodule(q).weight)


def test_diffmix_attention_processor_lora_is_converted(tmp_path):
    """Diff-Mix's file (unet.save_attn_procs, diffusers 0.25: ...processor.to_q_lora.down.weight, no alphas) gives
    the same fused weights as the same A, B in the PEFT layout."""
    file, layers = make_lora(tmp_path / "peft")
    old = {}
    for key, value in layers.items():  # e.g. <module>.to_out.0.lora_A.weight -> <module>.processor.to_out_lora.down.weight
        module, rest = key.split(".to_", 1)
        proj = rest.split(".lora_")[0].replace(".0", "")
        which = "down" if ".lora_A." in key else "up"
        old[f"{module}.processor.to_{proj}_lora.{which}.weight"] = value
    os.makedirs(tmp_path / "diffmix")
    save_file(old, str(tmp_path / "diffmix" / "pytorch_lora_weights.safetensors"))
    converted = load(spec={"source": "tiny", "lora": str(tmp_path / "diffmix")})
    reference = load(spec={"source": "tiny", "lora": file})
    assert converted.lora_components == ("unet",)
    assert digest(converted) == digest(reference) != digest(load())


def test_lora_that_matches_nothing_is_an_error(tmp_path):
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ValueError, match="no LoRA weights of .*flux.safetensors matched StableDiffusionImg2ImgPipeline"):
        load(spec={"source": "tiny", "lora": str(tmp_path / "flux.safetensors")})


# ----------------------------------------------------------------------------- textual inversion


def embeddings(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return {token: torch.randn(*shape, generator=g) for token, shape in shapes.items()}


def diffmix_file(path, seed=0):
    """Diff-Mix's learned_embeds file: one 768-d (here 32-d, the tiny encoder's width) vector per class token."""
    embeds = embeddings(seed, {"<class_0>": (32,), "<class_1>": (32,)})
    names = {"Red winged Blackbird": "<class_0>", "Cardinal": "<class_1>"}
    torch.save({"learned_embeds_dict": embeds, "name2placeholder": names,
                "placeholder2name": {v: k for k, v in names.items()}}, path)
    return embeds


def plain_file(path, seed=0):
    """DA-Fusion's merged file / diffusers' learned_embeds: {token: tensor}; one multi-vector token."""
    embeds = embeddings(seed, {"<red_winged_blackbird>": (32,), "<cardinal>": (1, 32), "<sky>": (2, 32)})
    save_file(embeds, str(path)) if str(path).endswith(".safetensors") else torch.save(embeds, path)
    return embeds


def test_diffmix_embeddings_add_tokens_and_map_class_names(tmp_path):
    embeds = diffmix_file(tmp_path / "learned_embeds-steps-last.bin")
    pipe = load("img2img", spec={"source": "tiny", "textual_inversion": str(tmp_path / "learned_embeds-steps-last.bin")})
    assert pipe.placeholder_tokens == ["<class_0>", "<class_1>"]
    assert pipe.class_tokens == {"Red winged Blackbird": "<class_0>", "Cardinal": "<class_1>"}
    for token, vector in embeds.items():
        assert torch.equal(token_row(pipe, token), vector)
    ids = pipe.tokenizer("a photo of a <class_1> bird").input_ids
    assert ids.count(pipe.tokenizer.convert_tokens_to_ids("<class_1>")) == 1  # one token, not its bytes


@pytest.mark.parametrize("name", ["learned_embeds.safetensors", "merged.pt"])
def test_plain_token_embeddings_and_the_bracket_rule(tmp_path, name):
    embeds = plain_file(tmp_path / name)
    pipe = load("text2img", spec={"source": "tiny", "textual_inversion": str(tmp_path / name)})
    assert sorted(pipe.placeholder_tokens) == ["<cardinal>", "<red_winged_blackbird>", "<sky>"]  # in file order
    assert pipe.class_tokens == {"red winged blackbird": "<red_winged_blackbird>", "cardinal": "<cardinal>",
                                 "sky": "<sky>"}
    assert torch.equal(token_row(pipe, "<cardinal>"), embeds["<cardinal>"][0])
    # a 2-vector embedding becomes <sky> <sky>_1, as diffusers does for multi-vector tokens
    assert torch.equal(token_row(pipe, "<sky>"), embeds["<sky>"][0])
    assert torch.equal(token_row(pipe, "<sky>_1"), embeds["<sky>"][1])


def test_the_embedding_reaches_the_image(tmp_path):
    """Same token, other vector: another image; prompts without the token: the same image."""
    diffmix_file(tmp_path / "a.bin", seed=0)
    diffmix_file(tmp_path / "b.bin", seed=1)
    a = load("text2img", spec={"source": "tiny", "textual_inversion": str(tmp_path / "a.bin")})
    b = load("text2img", spec={"source": "tiny", "textual_inversion": str(tmp_path / "b.bin")})
    with_token, without = ("a photo of a <class_0> bird",), ("a photo of a bird",)
    quick = dict(latent=True, guidance=1.0)  # the final latents: the decoder adds nothing here
    a_with, a_without = run(a, "text2img", with_token, **quick), run(a, "text2img", without, **quick)
    assert (a_with - run(b, "text2img", with_token, **quick)).abs().max() > 1e-4
    assert torch.equal(a_without, run(b, "text2img", without, **quick))
    assert not torch.equal(a_with, a_without)


def test_sdxl_embeddings_go_into_both_text_encoders(tmp_path):
    clip_l = embeddings(0, {"<cardinal>": (32,), "<sky>": (32,)})
    clip_g = embeddings(1, {"<cardinal>": (32,), "<sky>": (32,)})
    torch.save({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "sdxl.pt")
    pipe = load("text2img", "sdxl", spec={"source": "tiny", "textual_inversion": str(tmp_path / "sdxl.pt")})
    assert pipe.placeholder_tokens == ["<cardinal>", "<sky>"] and pipe.class_tokens["sky"] == "<sky>"
    for token in clip_l:
        assert torch.equal(token_row(pipe, token), clip_l[token])
        assert torch.equal(token_row(pipe, token, "_2"), clip_g[token])
    # the civitai layout: one tensor per encoder, the token is the file's stem
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}, str(tmp_path / "wintery.safetensors"))
    pipe = load("text2img", "sdxl", spec={"source": "tiny", "textual_inversion": str(tmp_path / "wintery.safetensors")})
    assert pipe.placeholder_tokens == ["wintery"] and pipe.class_tokens == {}
    assert {"wintery", "wintery_1"} <= set(pipe.tokenizer_2.get_vocab())


def test_textual_inversion_format_errors(tmp_path):
    plain_file(tmp_path / "one_encoder.safetensors")
    with pytest.raises(ValueError, match="two text encoders.*clip_l"):
        load("img2img", "sdxl", spec={"source": "tiny", "textual_inversion": str(tmp_path / "one_encoder.safetensors")})
    save_file({"clip_l": torch.randn(32), "clip_g": torch.randn(32)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="SDXL embedding file.*one text encoder"):
        load("img2img", "sd15", spec={"source": "tiny", "textual_inversion": str(tmp_path / "xl.safetensors")})
    save_file({"<wide>": torch.randn(768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"\{'<wide>': \(768,\)\} do not fit CLIPTextModel \(width 32\)"):
        load("img2img", spec={"source": "tiny", "textual_inversion": str(tmp_path / "wide.safetensors")})
    torch.save({"step": 3, "weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"models\['edit'\]\['textual_inversion'\]: .*no textual-inversion file"):
        ensure_available("edit", role(), ModelSpec("tiny", textual_inversion=str(tmp_path / "other.pt")))


# ----------------------------------------------------------------------------- availability


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_partial_download_names_the_missing_files(saved, tmp_path):
    partial = _copy(saved("img2img", "sd15"), tmp_path)
    for name in ("unet", "vae"):  # the folders exist, their files never arrived
        shutil.rmtree(partial / name)
        (partial / name).mkdir()
    spec = ModelSpec(str(partial))
    pattern = r"(?s)partial download.*missing: unet/config.json, unet/ weights .*vae/config.json, vae/ weights"
    with pytest.raises(GeneratorNotFoundError, match=pattern):
        ensure_available("edit", role(), spec)
    with pytest.raises(GeneratorNotFoundError, match=pattern):  # the producer's load says the same
        load_model(role(), spec, device="cpu")


def test_sharded_checkpoint_with_a_missing_shard(saved, tmp_path):
    folder = _copy(saved("img2img", "sd15"), tmp_path)
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "conv_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(GeneratorNotFoundError, match=r"missing: unet/diffusion_pytorch_model-00002-of-00002"):
        ensure_available("edit", role(), ModelSpec(str(folder)))


def test_model_index_problems_are_clear_errors(saved, tmp_path):
    folder = _copy(saved("img2img", "sdxl"), tmp_path)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    spec = ModelSpec(str(folder))
    index_path.write_text("[]")
    with pytest.raises(ValueError, match=r"model_index.json holds a JSON list \(\[\]\), not the object"):
        ensure_available("edit", role(), spec)
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k != "text_encoder_2"}))
    with pytest.raises(GeneratorNotFoundError, match=r"SDXL StableDiffusionXLImg2ImgPipeline is missing: "
                                                     r"text_encoder_2 \(not named in model_index.json\)"):
        ensure_available("edit", role(), spec)
    index_path.write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*not a Stable Diffusion 1.x or SDXL pipeline"):
        ensure_available("edit", role(), spec)


def test_a_folder_that_does_not_fit_the_kind(saved):
    folder = saved("img2img", "sd15")
    with pytest.raises(ValueError, match=r"in_channels=4, but task 'inpaint' needs in_channels=9 .*img2img or text2img"):
        ensure_available("inpaint", role("inpaint"), ModelSpec(folder))
    with pytest.raises(ValueError, match="in_channels=4, but task 'inpaint'"):
        load_model(role("inpaint"), ModelSpec(folder), device="cpu")


def test_missing_weights_and_files_say_how_to_get_them(tmp_path, empty_hf_home):
    with pytest.raises(GeneratorNotFoundError, match=r"(?s)not cached.*huggingface-cli download "
                                                     r"stabilityai/cosxl.*HF_HOME"):
        ensure_available("generate", role("text2img", "sdxl"), ModelSpec("stabilityai/cosxl"))
    with pytest.raises(GeneratorNotFoundError, match=r"(?s)huggingface-cli download "
                                                     r"diffusers/stable-diffusion-xl-1.0-inpainting-0.1"):
        ensure_available("inpaint", role("inpaint", "sdxl"), ModelSpec(str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match=r"models\['edit'\]\['lora'\]: LoRA file .*nope.safetensors does not "
                                                r"exist"):
        ensure_available("edit", role(), ModelSpec("tiny", lora=str(tmp_path / "nope.safetensors")))
    with pytest.raises(FileNotFoundError, match=r"textual inversion folder .* holds none of \['learned_embeds"):
        ensure_available("edit", role(), ModelSpec("tiny", textual_inversion=str(tmp_path)))


def test_describe_model_is_one_line():
    spec = ModelSpec("tiny-sdxl", lora="/loras/pytorch_lora_weights.safetensors", lora_scale=0.8,
                     textual_inversion="/ti/learned_embeds.bin")
    text = describe_model(role("text2img", "sd15", scheduler="edm_euler", scheduler_config={"sigma_max": 120.0}), spec)
    assert text == ("tiny random-weight SDXL text2img (in-process) + textual inversion learned_embeds.bin + LoRA "
                    "pytorch_lora_weights.safetensors (scale 0.8); scheduler edm_euler (sigma_max=120.0)")
    assert "\n" not in describe_model(role("inpaint"), ModelSpec("full-random"))


# ----------------------------------------------------------------------------- load policy


def test_bf16_lands_on_every_module_and_sdpa_everywhere():
    pipe = load("img2img", "sdxl", policy=LoadPolicy(dtype="bf16"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(pipe, name).dtype == torch.bfloat16, name
        assert not any(p.requires_grad for p in getattr(pipe, name).parameters())
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert all(type(p) is AttnProcessor2_0 for p in pipe.vae.attn_processors.values())
    assert pipe.text_encoder.config._attn_implementation == pipe.text_encoder_2.config._attn_implementation == "sdpa"
    assert pipe.vae_decodes_in_fp32 is False  # bf16 has fp32's range: no upcast
    assert torch.get_default_dtype() == torch.float32


def test_channels_last_and_cudnn_follow_the_policy(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    default = load("img2img")  # CPU: None means off
    assert not default.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark is False
    asked = load("img2img", policy=LoadPolicy(channels_last=True, cudnn_benchmark=True))
    for module in (asked.unet.conv_in, asked.vae.decoder.conv_in):
        assert module.weight.is_contiguous(memory_format=torch.channels_last)
        assert not module.weight.is_contiguous()
    assert torch.backends.cudnn.benchmark is True


def test_compile_wraps_the_unet_and_the_vae_decoder(tmp_path, monkeypatch):
    """torch.compile(unet, mode, fullgraph=False, dynamic=False) after the LoRA is fused (not run: inductor on a
    2-core CPU takes minutes; the producers compile on GPUs)."""
    calls = []
    real = torch.compile

    def recording(model, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    file, layers = make_lora(tmp_path)
    pipe = load("img2img", spec={"source": "tiny", "lora": file},
                policy=LoadPolicy(compile="max-autotune", compile_vae=True))
    expected = {"mode": "max-autotune", "fullgraph": False, "dynamic": False}
    assert calls == [("UNet2DConditionModel", expected), ("Decoder", expected)]
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(pipe.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
    compiled_q = pipe.unet._orig_mod.get_submodule(Q1)
    assert type(compiled_q) is torch.nn.Linear  # the compiled UNet holds the fused layer, no LoRA branch
    w0 = build_tiny_pipeline("img2img").unet.get_submodule(Q1).weight
    torch.testing.assert_close(compiled_q.weight, w0 + layers[f"{Q1}.lora_B.weight"] @ layers[f"{Q1}.lora_A.weight"])
    calls.clear()
    load("img2img", policy=LoadPolicy(compile=True))
    assert calls == [("UNet2DConditionModel", {"mode": "default", "fullgraph": False, "dynamic": False})]


def test_fused_qkv_projections_keep_the_output():
    fused = load("text2img", policy=LoadPolicy(fuse_qkv=True))
    assert all(type(p) is FusedAttnProcessor2_0 for p in fused.unet.attn_processors.values())
    assert all(type(p) is FusedAttnProcessor2_0 for p in fused.vae.attn_processors.values())
    quick = dict(prompts=("a photo of a bird",), guidance=1.0)  # decoded: the VAE's attention runs too
    torch.testing.assert_close(run(fused, "text2img", **quick), run(load("text2img"), "text2img", **quick),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sdxl_in_fp16_decodes_in_fp32():
    """SDXL's VAE has force_upcast: in fp16 the pipeline upcasts it for decoding, then casts it back."""
    pipe = load("text2img", "sdxl", policy=LoadPolicy(dtype="fp16"))
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float16 and pipe.vae_decodes_in_fp32 is True
    seen = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    out = run(pipe, "text2img", prompts=("a photo of a bird",))
    assert seen == [torch.float32] and pipe.vae.dtype == torch.float16
    assert torch.isfinite(out).all()


def test_a_loader_with_random_weights_checks_its_models_without_importing_diffusers():
    # the training process never runs a pipeline: importing diffusers there would cost seconds for nothing
    code = ("import sys\n"
            "from onlineaug import OnlineGenAugLoader\n"
            "from onlineaug.datasets import SyntheticShapes\n"
            "OnlineGenAugLoader(SyntheticShapes(num_classes=4, size=16, length=8), recipe='genmix', num_classes=4,\n"
            "                   batch_size=4, image_size=16, num_workers=0, progress=False)\n"
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_unknown_scheduler_name_fails_at_the_check_and_known_settings_are_matched_to_the_class():
    from onlineaug.models.diffusion_checks import check_scheduler

    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; expected one of euler_a, euler, ddim, dpm\+\+, "
                                         r"pndm, edm_euler or None"):
        check_scheduler("heun", None)
    assert check_scheduler("edm_euler", {"sigma_max": 120}).__name__ == "EDMEulerScheduler"
    with pytest.raises(ValueError, match=r"scheduler_config keys \['sigma_maxx'\] are not settings of "
                                         r"EDMEulerScheduler"):
        check_scheduler("edm_euler", {"sigma_maxx": 120})
