"""Model-based rewards on tiny random models built in code (no download): shape, determinism, batch-size
invariance, the LAION head against a hand computation, and errors that name the reward and the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpo.rewards import RewardError, build_reward
from ddpo.rewards.clip import aesthetic_head, load_aesthetic_head
from ddpo.rewards.tiny import save_tiny_aesthetic_head, save_tiny_clip, save_tiny_llava

PROMPTS = ["a red circle", "two dogs playing chess", "a horse riding a bike", "a cat", "three blue squares"]


def images(count: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    return save_tiny_aesthetic_head(tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth", input_dim=8)


@pytest.fixture(scope="module")
def model_rewards(clip_dir, llava_dir, head_path):
    """name -> (reward scoring a whole batch, the same reward scoring in batches of 2)."""
    kwargs = {
        "aesthetic": {"model": str(clip_dir), "head": str(head_path)},
        "clip_score": {"model": str(clip_dir)},
        "pickscore": {"model": str(clip_dir), "processor": None},
        "vlm_caption_bertscore": {"model": str(llava_dir), "max_new_tokens": 6},
        "vlm_yes_no": {"model": str(llava_dir)},
    }
    return {
        name: (build_reward(name, device="cpu", batch_size=8, **args), build_reward(name, device="cpu", batch_size=2, **args))
        for name, args in kwargs.items()
    }


REWARD_NAMES = ["aesthetic", "clip_score", "pickscore", "vlm_caption_bertscore", "vlm_yes_no"]


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_shape_determinism_and_batch_size_invariance(model_rewards, name):
    batched, in_pairs = model_rewards[name]
    pictures, metadata = images(), [{}] * len(PROMPTS)
    first = batched(pictures, PROMPTS, metadata).scores
    assert first.dtype == np.float32 and first.shape == (5,) and np.isfinite(first).all()
    np.testing.assert_array_equal(batched(pictures, PROMPTS, metadata).scores, first)  # deterministic
    # Within 1e-5, and float32's resolution for scores far from 0 (clip_score is 100 x a cosine): a float32
    # forward pass over another batch size sums in another order, ~1e-7 relative.
    np.testing.assert_allclose(in_pairs(pictures, PROMPTS, metadata).scores, first, atol=1e-5, rtol=1e-6)
    one_at_a_time = np.concatenate([batched([image], [prompt], [{}]).scores for image, prompt in zip(pictures, PROMPTS)])
    np.testing.assert_allclose(one_at_a_time, first, atol=1e-5, rtol=1e-6)
    if name != "vlm_caption_bertscore":  # a random VLM's greedy caption can ignore the image
        assert np.ptp(first) > 1e-6  # the scores depend on the input


def test_prompt_rewards_depend_on_the_prompt(model_rewards):
    image = images(1) * 2
    for name in ("clip_score", "pickscore", "vlm_yes_no", "vlm_caption_bertscore"):
        scores = model_rewards[name][0](image, ["a red circle", "two dogs playing chess"], [{}, {}]).scores
        assert scores[0] != scores[1], name


def test_clip_score_is_100_cosines_and_pickscore_the_models_logit_scale(model_rewards, clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pictures = images(2)
    with torch.no_grad():
        inputs = processor(images=pictures, text=PROMPTS[:2], return_tensors="pt", padding=True)
        output = model(**inputs)  # CLIP's own forward: logits_per_image = exp(logit_scale) * cosines
    cosines = torch.diagonal(output.logits_per_image).numpy() / model.logit_scale.exp().item()
    np.testing.assert_allclose(model_rewards["clip_score"][0](pictures, PROMPTS[:2], [{}, {}]).scores, 100 * cosines, atol=1e-4)
    np.testing.assert_allclose(model_rewards["pickscore"][0](pictures, PROMPTS[:2], [{}, {}]).scores, torch.diagonal(output.logits_per_image).numpy(), atol=1e-4)


def test_laion_head_maps_a_known_embedding_to_a_hand_computed_value(head_path):
    head = load_aesthetic_head(head_path)
    state = torch.load(head_path, weights_only=True)
    embedding = np.linspace(-1, 1, 8)
    embedding /= np.linalg.norm(embedding)
    value = embedding.astype(np.float64)
    for layer in (0, 2, 4, 6, 7):  # the released layout: affine maps, dropout between, no non-linearity
        value = state[f"layers.{layer}.weight"].double().numpy() @ value + state[f"layers.{layer}.bias"].double().numpy()
    with torch.no_grad():
        got = head(torch.tensor(embedding, dtype=torch.float32)[None]).item()
    assert got == pytest.approx(float(value[0]), abs=1e-6)


def test_laion_head_with_set_weights():
    """All weights 1/fan_in and biases 0.5: each layer maps a constant vector c to c + 0.5, so a constant
    embedding of value c (before the head) ends at c + 2.5 after the five layers."""
    head = aesthetic_head(4)
    with torch.no_grad():
        for layer in head:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.fill_(1 / layer.in_features)
                layer.bias.fill_(0.5)
    assert head.eval()(torch.full((1, 4), 0.5)).item() == pytest.approx(3.0)
    assert [name for name, _ in head.named_parameters()][::2] == [f"{i}.weight" for i in (0, 2, 4, 6, 7)]


def test_aesthetic_is_the_head_of_the_normalised_image_embedding(model_rewards, clip_dir, head_path):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pictures = images(3)
    with torch.no_grad():
        embedding = model.visual_projection(model.vision_model(**processor(images=pictures, return_tensors="pt")).pooler_output)
        expected = load_aesthetic_head(head_path)(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1).numpy()
    np.testing.assert_allclose(model_rewards["aesthetic"][0](pictures, ["x"] * 3, [{}] * 3).scores, expected, atol=1e-5)


def test_vlm_caption_reward_is_bertscore_recall_of_its_captions(model_rewards):
    from ddpo.rewards.bertscore import BERTScorer, minilm_path

    output = model_rewards["vlm_caption_bertscore"][0](images(2), PROMPTS[:2], [{}, {}])
    captions = output.info["captions"]
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    _, recall, _ = BERTScorer(minilm_path(), match_special_tokens=True).score(captions, [f"The image contains {p}" for p in PROMPTS[:2]])
    np.testing.assert_allclose(output.scores, recall, atol=1e-6)


def test_vlm_yes_no_is_the_sigmoid_of_the_yes_no_logit_gap(model_rewards, llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = LlavaForConditionalGeneration.from_pretrained(llava_dir), AutoProcessor.from_pretrained(llava_dir)
    image, prompt = images(1)[0], "a horse riding a bike"
    text = f'USER: <image>\nDoes this image match the caption "{prompt}"? Answer yes or no. ASSISTANT:'
    with torch.no_grad():
        logits = model(**processor(images=[image], text=[text], return_tensors="pt")).logits[0, -1]
    yes, no = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    expected = torch.sigmoid(logits[yes] - logits[no]).item()
    assert model_rewards["vlm_yes_no"][0]([image], [prompt], [{}]).scores[0] == pytest.approx(expected, abs=1e-6)


def test_a_missing_checkpoint_is_named(tmp_path, head_path):
    with pytest.raises(ValueError, match=r"^reward 'clip_score' cannot load its CLIP model from '.*no-such-clip'"):
        build_reward("clip_score", model=str(tmp_path / "no-such-clip"), device="cpu")
    with pytest.raises(ValueError, match="reward 'vlm_yes_no' cannot load its VLM from"):
        build_reward("vlm_yes_no", model=str(tmp_path / "no-such-vlm"), device="cpu")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, float16, bfloat16"):
        build_reward("clip_score", model=str(tmp_path), dtype="fp8")


def test_a_head_for_another_clip_is_refused(clip_dir, tmp_path):
    wide = save_tiny_aesthetic_head(tmp_path / "head.pth", input_dim=768)
    with pytest.raises(ValueError, match="the head takes 768-d embeddings but .* makes 8-d ones"):
        build_reward("aesthetic", model=str(clip_dir), head=str(wide), device="cpu")


def test_yes_no_words_must_be_single_tokens(llava_dir):
    with pytest.raises(ValueError, match="'Yes indeed' is 2 tokens for this tokenizer"):
        build_reward("vlm_yes_no", model=str(llava_dir), yes="Yes indeed", device="cpu")


def test_a_model_reward_failure_names_reward_and_prompt(model_rewards):
    with pytest.raises(RewardError, match=r"^reward 'clip_score' raised .* on prompt 'a cat'"):
        model_rewards["clip_score"][0]([object()], ["a cat"], [{}])


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "vlm_yes_no"])
def test_half_precision_runs_and_stays_close_to_float32(model_rewards, clip_dir, llava_dir, head_path, name):
    """dtype="bfloat16" (what a GPU would use as float16) loads the model in it and feeds it pixels in it."""
    kwargs = {"aesthetic": {"model": str(clip_dir), "head": str(head_path)}, "clip_score": {"model": str(clip_dir)}, "vlm_yes_no": {"model": str(llava_dir)}}[name]
    half = build_reward(name, device="cpu", dtype="bfloat16", **kwargs)
    pictures = images()
    full_scores = model_rewards[name][0](pictures, PROMPTS, [{}] * 5).scores
    half_scores = half(pictures, PROMPTS, [{}] * 5).scores
    assert half_scores.dtype == np.float32 and np.isfinite(half_scores).all()
    scale = {"aesthetic": 1.0, "clip_score": 100.0, "vlm_yes_no": 1.0}[name]
    assert np.abs(half_scores - full_scores).max() < 0.05 * scale
    assert not np.array_equal(half_scores, full_scores)  # it did run in another precision
