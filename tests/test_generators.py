"""Tests for onlineaug.generators: tiny/full-random pipelines, the from_pretrained path, errors.

No weights are downloaded: the real loading path is exercised with ``save_tiny_pipeline`` folders and
a hand-made HF cache layout. Device-aware tests take the ``device`` fixture (``--device cuda``).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
)

from onlineaug.generators import (
    TASKS,
    GeneratorNotFoundError,
    describe,
    ensure_available,
    load_pipeline,
    save_tiny_pipeline,
)
from onlineaug.generators import full_random
from onlineaug.generators.loading import SCHEDULERS
from onlineaug.generators.tiny import build_tiny_pipeline
from onlineaug.generators.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_CLASSES = {
    "instruct-pix2pix": StableDiffusionInstructPix2PixPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "text2img": StableDiffusionPipeline,
    "inpaint": StableDiffusionInpaintPipeline,
}
IN_CHANNELS = {"instruct-pix2pix": 8, "img2img": 4, "text2img": 4, "inpaint": 9}
# Released parameter counts (diffusers/transformers configs of SD 1.5 and CLIP ViT-L/14).
SD15_UNET_PARAMS = 859_520_964
IP2P_EXTRA_PARAMS = 4 * 320 * 3 * 3  # 4 more input channels of conv_in (3x3, 320 outputs)
SD_VAE_PARAMS = 83_653_863
CLIP_L14_TEXT_PARAMS = 123_060_480


def weights_digest(pipe) -> str:
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(pipe, task, batch=2, size=64, steps=2, seed=0):
    """One real pipeline call with per-sample generators; returns (batch, 3, size, size) in [0, 1]."""
    prompts = ["make it snow", "turn it into a watercolor painting", "b", "c"][:batch]
    prompts += [f"prompt {i}" for i in range(len(prompts), batch)]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    kwargs = dict(prompt=prompts, num_inference_steps=steps, generator=generators, output_type="pt")
    image = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1000))
    if task == "instruct-pix2pix":
        kwargs.update(image=image, guidance_scale=4.0, image_guidance_scale=1.5)
    elif task == "img2img":
        kwargs.update(image=image, strength=1.0, guidance_scale=4.0)
    elif task == "inpaint":
        mask = torch.zeros(batch, 1, size, size)
        mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
        kwargs.update(image=image, mask_image=mask, strength=1.0, guidance_scale=4.0, height=size, width=size)
    else:
        kwargs.update(height=size, width=size, guidance_scale=4.0)
    return pipe(**kwargs).images


def assert_same_output(a, b, device):
    if device.type == "cpu":
        assert torch.equal(a, b), f"outputs differ by up to {(a - b).abs().max().item():.3g}"
    else:
        torch.testing.assert_close(a, b)  # dtype-default tolerances (fp16 on CUDA)


@pytest.fixture(scope="module")
def saved_ip2p(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-ip2p"), task="instruct-pix2pix", seed=0)


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("ONLINEAUG_ALLOW_DOWNLOAD", raising=False)
    return home


# ----------------------------------------------------------------------------- tiny pipelines


@pytest.mark.parametrize("task", TASKS)
def test_tiny_pipeline_runs(task, device):
    pipe = load_pipeline("tiny", task, device=device)
    assert type(pipe) is PIPELINE_CLASSES[task]
    assert pipe.unet.config.in_channels == IN_CHANNELS[task]
    assert pipe.unet.config.out_channels == 4 and pipe.vae.config.latent_channels == 4
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor == 8  # the real SD latent geometry
    assert pipe.unet.device.type == device.type
    assert pipe.unet.dtype == (torch.float16 if device.type == "cuda" else torch.float32)
    out = run(pipe, task)
    assert out.shape == (2, 3, 64, 64)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out[0], out[1])  # different prompts and noise give different images


def test_tiny_ip2p_256px(device):
    pipe = load_pipeline("tiny", "instruct-pix2pix", device=device)
    out = run(pipe, "instruct-pix2pix", batch=1, size=256, steps=1)
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_tiny_default_schedulers():
    assert type(load_pipeline("tiny", "instruct-pix2pix").scheduler) is EulerAncestralDiscreteScheduler
    assert type(load_pipeline("tiny", "img2img").scheduler) is PNDMScheduler  # as SD 1.5 ships
    ddim = load_pipeline("tiny", "instruct-pix2pix", scheduler="ddim").scheduler
    assert type(ddim) is SCHEDULERS["ddim"]


def test_tiny_same_seed_same_weights_and_outputs(device):
    a = load_pipeline("tiny", "instruct-pix2pix", device=device, seed=3)
    b = load_pipeline("tiny", "instruct-pix2pix", device=device, seed=3)
    assert weights_digest(a) == weights_digest(b)
    assert_same_output(run(a, "instruct-pix2pix"), run(b, "instruct-pix2pix"), device)


def test_tiny_different_seeds_different_weights():
    a, b = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        wa, wb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert wa.keys() == wb.keys()
        assert any(not torch.equal(wa[k], wb[k]) for k in wa), f"{name} weights equal for seeds 0 and 1"


def test_tiny_build_does_not_touch_global_rng():
    before = torch.get_rng_state()
    build_tiny_pipeline(seed=5)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_tiny_weights_identical_in_another_process():
    code = textwrap.dedent(
        """
        import hashlib, torch
        from onlineaug.generators.tiny import build_tiny_pipeline
        torch.manual_seed(1234)  # the caller's global RNG state must not matter
        pipe = build_tiny_pipeline(seed=7)
        h = hashlib.sha256()
        for name in ("unet", "vae", "text_encoder"):
            for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
                h.update(f"{name}.{key}".encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        print(h.hexdigest())
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    torch.manual_seed(999)
    assert result.stdout.strip().splitlines()[-1] == weights_digest(build_tiny_pipeline(seed=7))


# ----------------------------------------------------------------------------- tokenizer


def test_generated_tokenizer():
    tok = build_tokenizer()
    assert tok.model_max_length == MODEL_MAX_LENGTH == 77
    assert len(tok) == VOCAB_SIZE == 514
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (512, 513)
    texts = ["Make it SNOW", "café ☃ 123!", "x " * 200]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert ids.shape == (3, 77)
    assert ids.min() >= 0 and ids.max() < VOCAB_SIZE
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert ids[2, -1] == tok.eos_token_id  # truncated, still ends with the end token
    assert tok.decode(ids[0], skip_special_tokens=True) == "make it snow"  # lower-cased, byte-level
    n = len(tok("make it snow").input_ids)  # bos + 10 letters (no merges, no spaces) + eos
    assert n == 12 and (ids[0, n:] == tok.pad_token_id).all()


def test_tokenizer_ids_fit_text_encoders():
    tiny = build_tiny_pipeline()
    assert len(tiny.tokenizer) <= tiny.text_encoder.config.vocab_size
    assert tiny.text_encoder.config.max_position_embeddings == tiny.tokenizer.model_max_length
    assert VOCAB_SIZE <= full_random.CLIP_VIT_L14_TEXT_CONFIG["vocab_size"] == 49408


# ----------------------------------------------------------------------------- real loading path


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_saved_tiny_loads_through_from_pretrained(saved_ip2p, scheduler, device):
    assert os.path.isfile(os.path.join(saved_ip2p, "model_index.json"))
    loaded = load_pipeline(saved_ip2p, "instruct-pix2pix", device=device, scheduler=scheduler)
    assert loaded.unet.config._name_or_path.startswith(saved_ip2p)  # really read from the folder
    assert type(loaded.scheduler) is SCHEDULERS[scheduler]
    in_process = load_pipeline("tiny", "instruct-pix2pix", device=device, scheduler=scheduler, seed=0)
    assert weights_digest(loaded) == weights_digest(in_process)
    assert_same_output(run(loaded, "instruct-pix2pix"), run(in_process, "instruct-pix2pix"), device)


def test_saved_tiny_default_scheduler_is_euler_ancestral(saved_ip2p):
    pipe = load_pipeline(saved_ip2p, "instruct-pix2pix")
    assert type(pipe.scheduler) is EulerAncestralDiscreteScheduler
    assert describe(saved_ip2p) == f"local folder {saved_ip2p} (StableDiffusionInstructPix2PixPipeline)"


def test_load_from_hf_cache_honours_hf_home(saved_ip2p, empty_hf_home):
    repo = empty_hf_home / "hub" / "models--someorg--tiny-ip2p"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(saved_ip2p, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cache = empty_hf_home / "hub"
    assert describe("someorg/tiny-ip2p") == f"hub id someorg/tiny-ip2p (HF cache at {cache}, cached)"
    ensure_available("someorg/tiny-ip2p", "instruct-pix2pix")
    pipe = load_pipeline("someorg/tiny-ip2p", "instruct-pix2pix")
    assert weights_digest(pipe) == weights_digest(build_tiny_pipeline(seed=0))

    shutil.rmtree(repo / "snapshots" / commit / "unet")  # a partial download
    with pytest.raises(GeneratorNotFoundError, match="Underlying error"):
        load_pipeline("someorg/tiny-ip2p", "instruct-pix2pix")


def test_task_mismatch_is_reported(saved_ip2p):
    with pytest.raises(ValueError, match="in_channels=8.*instruct-pix2pix"):
        load_pipeline(saved_ip2p, "img2img")


# ----------------------------------------------------------------------------- errors


def test_ensure_available_checks_without_loading(saved_ip2p, tmp_path, empty_hf_home):
    for spec in ("tiny", "full-random", saved_ip2p):
        ensure_available(spec, "instruct-pix2pix")  # no error
    with pytest.raises(ValueError, match="in_channels=8"):
        ensure_available(saved_ip2p, "text2img")
    with pytest.raises(GeneratorNotFoundError, match="(?s)huggingface-cli download.*HF_HOME"):
        ensure_available(str(tmp_path / "missing"), "instruct-pix2pix")
    with pytest.raises(GeneratorNotFoundError, match="not cached"):
        ensure_available("timbrooks/instruct-pix2pix", "instruct-pix2pix")
    partial = tmp_path / "partial"
    shutil.copytree(saved_ip2p, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(GeneratorNotFoundError, match=r"partial download.*missing: vae/"):
        ensure_available(str(partial), "instruct-pix2pix")
    with pytest.raises(ValueError, match="unknown task"):
        ensure_available("tiny", "depth2img")



def test_missing_folder_says_how_to_get_weights(tmp_path, empty_hf_home):
    missing = str(tmp_path / "no" / "such" / "folder")
    with pytest.raises(GeneratorNotFoundError) as info:
        load_pipeline(missing, "instruct-pix2pix")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("huggingface-cli download timbrooks/instruct-pix2pix", "hf download", "HF_HOME", missing):
        assert needle in message


def test_uncached_hub_id_says_how_to_get_weights(empty_hf_home):
    with pytest.raises(GeneratorNotFoundError) as info:
        load_pipeline("timbrooks/instruct-pix2pix", "instruct-pix2pix")
    message = str(info.value)
    for needle in ("huggingface-cli download timbrooks/instruct-pix2pix", "HF_HOME",
                   str(empty_hf_home / "hub"), "ONLINEAUG_ALLOW_DOWNLOAD"):
        assert needle in message
    assert describe("timbrooks/instruct-pix2pix").endswith("not cached)")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "notes.txt").write_text("not a pipeline")
    with pytest.raises(GeneratorNotFoundError, match="not a diffusers pipeline folder.*model_index.json"):
        load_pipeline(str(tmp_path), "instruct-pix2pix")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(GeneratorNotFoundError, match="from_single_file"):
        load_pipeline(str(tmp_path), "instruct-pix2pix")


def test_unknown_task_names_valid_ones():
    for call in (lambda: load_pipeline("tiny", "depth2img"), lambda: describe("tiny", "depth2img")):
        with pytest.raises(ValueError) as info:
            call()
        assert all(task in str(info.value) for task in TASKS)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(scheduler="heun"), ValueError, "euler_a"),
        (dict(dtype="half-ish"), ValueError, "fp16"),
        (dict(dtype=torch.int8), TypeError, "floating"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(device="meta"), ValueError, "meta"),
        (dict(device="gpu0"), ValueError, "is not a device; use .cpu., .cuda. or .cuda:N."),
        (dict(compile_unet="yes"), TypeError, "compile_unet"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        load_pipeline("tiny", "instruct-pix2pix", **kwargs)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="spec"):
        load_pipeline(None, "instruct-pix2pix")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="cuda.is_available"):
        load_pipeline("tiny", "instruct-pix2pix", device="cuda")


# ----------------------------------------------------------------------------- policy


def test_dtype_and_compile_policy():
    pipe = load_pipeline("tiny", "instruct-pix2pix", dtype="bf16", compile_unet=True)
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)  # wrapped, not yet compiled
    assert pipe.unet.config.in_channels == 8 and pipe.unet.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert torch.get_default_dtype() == torch.float32
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.vae.attn_processors.values())
    assert pipe._progress_bar_config == {"disable": True}


def test_describe():
    assert describe("tiny", "instruct-pix2pix") == "tiny random-weight SD 1.x InstructPix2Pix (in-process)"
    assert describe("tiny", "inpaint", "sdxl") == "tiny random-weight SDXL inpainting (in-process)"
    assert describe("tiny").startswith("tiny random-weight")
    text = describe("full-random", "instruct-pix2pix")
    assert "random-weight" in text and "untrained" in text and "InstructPix2Pix" in text
    assert describe("/no/such/dir") == "local folder /no/such/dir (missing)"


# ----------------------------------------------------------------------------- full-size random weights


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_full_random_parameter_counts_on_meta():
    ip2p = full_random.build_full_random_pipeline("instruct-pix2pix", device="meta", dtype=torch.float16)
    assert ip2p.unet.device.type == "meta" and ip2p.unet.dtype == torch.float16
    assert count(ip2p.unet) == SD15_UNET_PARAMS + IP2P_EXTRA_PARAMS
    assert count(ip2p.vae) == SD_VAE_PARAMS
    assert count(ip2p.text_encoder) == CLIP_L14_TEXT_PARAMS
    assert count(full_random.build_full_random_unet("img2img", device="meta")) == SD15_UNET_PARAMS
    te = ip2p.text_encoder.config
    assert (te.hidden_size, te.intermediate_size, te.projection_dim) == (768, 3072, 768)
    assert (te.num_hidden_layers, te.num_attention_heads, te.vocab_size) == (12, 12, 49408)
    assert te.max_position_embeddings == 77 and te.hidden_act == "quick_gelu"
    assert ip2p.vae.config.scaling_factor == 0.18215 and ip2p.vae_scale_factor == 8
    assert torch.get_default_dtype() == torch.float32  # the temporary default dtype was restored


def test_full_random_forward_shapes_on_meta():
    """The real configs fit together (token ids -> 768-d text states -> cross-attention -> VAE) without
    allocating or computing anything: meta tensors carry shapes through every op."""
    pipe = full_random.build_full_random_pipeline("instruct-pix2pix", device="meta")
    ids = pipe.tokenizer(["make it snow"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids.to("meta")).last_hidden_state
        latent = pipe.vae.encode(torch.empty(2, 3, 64, 64, device="meta")).latent_dist.mode()
        noisy = torch.empty(2, 8, 8, 8, device="meta")  # noisy latent + image latent
        eps = pipe.unet(noisy, torch.tensor(10, device="meta"), encoder_hidden_states=text.expand(2, -1, -1))
        image = pipe.vae.decode(latent).sample
    assert text.shape == (1, 77, 768)
    assert latent.shape == eps.sample.shape == (2, 4, 8, 8)
    assert image.shape == (2, 3, 64, 64)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ONLINEAUG_TEST_FULL_RANDOM") != "1",
    reason="initialising 1.07B random parameters takes 10-25 s on a 2-core CPU; "
    "set ONLINEAUG_TEST_FULL_RANDOM=1 (on a GPU with --device cuda it takes about a second)",
)
def test_full_random_runs_end_to_end(device):
    pipe = load_pipeline("full-random", "instruct-pix2pix", device=device)
    assert count(pipe.unet) == SD15_UNET_PARAMS + IP2P_EXTRA_PARAMS
    out = run(pipe, "instruct-pix2pix", batch=1, size=64, steps=1)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
