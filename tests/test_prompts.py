"""Prompt embeddings computed once per pipeline and prompt set (onlineaug.recipes.prompts), as DiffuseMix/GenMix
producers use them: the text encoder runs once across produce calls, and the edits equal the uncached ones."""

import pytest
import torch

from onlineaug.images import resize_uint8
from onlineaug.models import ModelSpec, load_model
from onlineaug.producer import standalone_context
from onlineaug.recipes import SourceBatch, get_recipe
from onlineaug.recipes.generation import to_uint8
from onlineaug.recipes.prompts import cacheable, encoder_calls, prompt_embeddings

SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    recipe = get_recipe("genmix", num_inference_steps=2, generation_size=SIZE)
    return load_model(recipe.model_roles()["edit"], ModelSpec("tiny"), device="cpu")


def _sources(count: int, seed: int) -> SourceBatch:
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return SourceBatch(images=images, originals=resize_uint8(images, 16), labels=torch.zeros(count, dtype=torch.int64),
                       indices=torch.arange(count))


class EncoderCalls:
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.count += 1


def test_text_encoder_runs_once_across_produce_calls_and_edits_equal_the_uncached(pipe):
    recipe = get_recipe("genmix", num_inference_steps=2, generation_size=SIZE)
    counter = EncoderCalls(pipe.text_encoder)
    try:
        cached = []
        for seed in range(3):
            ctx = standalone_context(num_classes=1, image_size=16, seed=seed)
            with torch.inference_mode():
                cached.append(recipe.produce({"edit": pipe}, _sources(3, seed), ctx).payload)
        assert counter.count == 1 and encoder_calls(pipe) == 1  # the nine prompts and "" in one call, once
        for seed, payload in enumerate(cached):
            # the uncached call: prompt strings, the same prompt draws and per-row noise as produce's stream
            ctx = standalone_context(num_classes=1, image_size=16, seed=seed)
            ids = torch.randint(len(recipe.prompts), (3,), generator=ctx.generator)
            seeds = torch.randint(2**62, (3,), generator=ctx.generator).tolist()
            assert torch.equal(ids, payload["prompt_id"])
            with torch.inference_mode():
                edited = pipe(prompt=[recipe.prompt_text(i) for i in ids.tolist()],
                              image=_sources(3, seed).images.float().div(255), num_inference_steps=2,
                              guidance_scale=recipe.guidance_scale, image_guidance_scale=recipe.image_guidance_scale,
                              generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
            expected, finite = to_uint8(edited, 16)
            assert finite.all()
            assert torch.equal(payload["generated"], expected)  # the text encoder is per row: same embeddings
        assert counter.count == 1 + 3 * 2  # the uncached calls encode prompts and "" each time
    finally:
        counter.handle.remove()


def test_embeddings_match_the_pipelines_own_encoding(pipe):
    texts = ["autumn", "snowy", "autumn"]
    table = prompt_embeddings(pipe, texts)
    with torch.inference_mode():
        direct = pipe._encode_prompt(texts, torch.device("cpu"), 1, False)
    assert table.shape == direct.shape == (3, 77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(table, direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(table[0], table[2])


def test_new_texts_are_encoded_together_and_a_grown_tokenizer_resets_the_cache():
    recipe = get_recipe("genmix", num_inference_steps=2, generation_size=SIZE)
    pipe = load_model(recipe.model_roles()["edit"], ModelSpec("tiny"), device="cpu")
    prompt_embeddings(pipe, ["a", "b"])
    prompt_embeddings(pipe, ["b", "a"])
    assert encoder_calls(pipe) == 1
    prompt_embeddings(pipe, ["c", "a", "d"])  # two new texts, one call
    assert encoder_calls(pipe) == 2
    pipe.tokenizer.add_tokens(["<cat-token>"])  # textual inversion grows the vocabulary: embeddings may change
    prompt_embeddings(pipe, ["a"])
    assert encoder_calls(pipe) == 1  # a fresh cache, filled by one call


def test_uncached_pipelines_get_prompt_strings():
    recipe = get_recipe("diffusemix", num_inference_steps=2)
    assert not cacheable(object()) and prompt_embeddings(object(), ["a"]) is None
    arguments = recipe.prompt_arguments(object(), torch.tensor([0, 2]))
    assert arguments == {"prompt": [recipe.prompt_text(0), recipe.prompt_text(2)]}
    with pytest.raises(TypeError, match="prompt texts must be strings"):
        prompt_embeddings(load_model(recipe.model_roles()["edit"], ModelSpec("tiny"), device="cpu"), ["a", 3])
