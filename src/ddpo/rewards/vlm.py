"""Rewards that ask a vision-language model about the image (any transformers image-text-to-text model
with a processor: LLaVA, BLIP-2, Qwen-VL, ...).

- `vlm_caption_bertscore` (Black et al. 2023, Sec. 6.3, prompt-image alignment): the VLM answers "What is
  going on in this image?", and its answer is scored by BERTScore recall against "The image contains
  {prompt}": recall asks whether everything the prompt asks for is in the description.
- `vlm_yes_no` (the VLM score of FDFO, McAllister et al.): sigmoid(logit("Yes") - logit("No")) of the VLM's
  next token after 'Does this image match the caption "{prompt}"? Answer yes or no.', i.e. P(yes) when the
  model answers only yes or no.

The question is wrapped in the processor's chat template when it has one (the image first, then the text,
then the generation prompt), otherwise in `prompt_template` ("{question}" alone for plain captioners).
Captions are generated greedily, so that a reward is a deterministic function of the image.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ddpo.rewards.base import Reward, RewardOutput, register_reward
from ddpo.rewards.loading import batches, load_or_explain, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch

LLAVA = "llava-hf/llava-1.5-7b-hf"
CAPTION_QUESTION = "What is going on in this image?"
CAPTION_REFERENCE = "The image contains {prompt}"
YES_NO_QUESTION = 'Does this image match the caption "{prompt}"? Answer yes or no.'


@functools.lru_cache(maxsize=2)
def _load_vlm(reward: str, model: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = load_or_explain(reward, "VLM", model, lambda: AutoModelForImageTextToText.from_pretrained(model, dtype=dtype))
    processor = load_or_explain(reward, "VLM processor", model, lambda: AutoProcessor.from_pretrained(model))
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched decoder-only inputs end where the answer begins
    return loaded.to(device).eval().requires_grad_(False), processor


class VLM:
    """One image-text-to-text model and its processor, asked one question per image."""

    def __init__(self, reward: str, model: str, device: str | None, dtype: str, prompt_template: str | None) -> None:
        self.reward = reward
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.processor = _load_vlm(reward, str(model), self.device, self.dtype)
        if prompt_template is not None and "{question}" not in prompt_template:
            raise ValueError(f"reward {reward!r}: prompt_template must contain '{{question}}', got {prompt_template!r}")
        if prompt_template is None and getattr(self.processor, "chat_template", None) is None:
            prompt_template = "{question}"
        self.prompt_template = prompt_template

    def text(self, question: str) -> str:
        """The model's input text for `question` about one image."""
        if self.prompt_template is not None:
            return self.prompt_template.format(question=question)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def inputs(self, images: list[Image.Image], questions: list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs on the model's device; floating tensors (pixels) in the model's dtype."""
        encoded = self.processor(
            images=[image.convert("RGB") for image in images], text=[self.text(q) for q in questions], padding=True, return_tensors="pt"
        )
        return {
            key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in encoded.items()
        }

    def token_id(self, word: str) -> int:
        """The id of `word` as one token.

        Raises:
            ValueError: the tokenizer splits `word` into several tokens.
        """
        ids = self.processor.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"reward {self.reward!r}: {word!r} is {len(ids)} tokens for this tokenizer, not one; pass another word")
        return ids[0]


@register_reward("vlm_caption_bertscore")
def vlm_caption_bertscore(
    model: str = LLAVA,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    question: str = CAPTION_QUESTION,
    reference: str = CAPTION_REFERENCE,
    max_new_tokens: int = 48,
    prompt_template: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
) -> Reward:
    """Reward = BERTScore recall of the VLM's answer to `question` against `reference` with the prompt.

    Args:
        model: image-text-to-text checkpoint (hub id or directory), e.g. an llava-hf model.
        bertscore_model: BERTScore encoder (local directory or cached hub id); None is the bundled
            all-MiniLM-L6-v2 (a dependency of ddpo). The paper's LLaVA server used microsoft/deberta-xlarge-mnli
            (bert-score's choice, with `bertscore_layers=40`).
        bertscore_layers: hidden layer of the encoder; None is its last.
        question: what the VLM is asked about each image.
        reference: the text the answer is compared with; "{prompt}" is replaced by the prompt.
        max_new_tokens: longest answer; generation is greedy.
        prompt_template: the VLM's input text as a format string of "{question}" (the image token included if
            the model needs one); None uses the processor's chat template, or the bare question without one.
        device, dtype: where and in which precision the VLM runs (BERTScore runs in float32).
        batch_size: images per generate call.

    info: `captions`, the VLM's answers.
    """
    from ddpo.rewards.bertscore import BERTScorer, minilm_path

    if "{prompt}" not in reference:
        raise ValueError(f"reward 'vlm_caption_bertscore': reference must contain '{{prompt}}', got {reference!r}")
    vlm = VLM("vlm_caption_bertscore", model, device, dtype, prompt_template)
    encoder = str(bertscore_model) if bertscore_model else minilm_path()
    scorer = load_or_explain(
        "vlm_caption_bertscore", "BERTScore encoder", str(encoder),
        lambda: BERTScorer(encoder, num_layers=bertscore_layers, device=vlm.device, match_special_tokens=True),
    )  # fmt: skip

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        import torch

        captions: list[str] = []
        with torch.inference_mode():
            for batch in batches(images, batch_size):
                inputs = vlm.inputs(batch, [question] * len(batch))
                generated = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                answers = generated[:, inputs["input_ids"].shape[1] :]  # the new tokens only
                captions += [text.strip() for text in vlm.processor.batch_decode(answers, skip_special_tokens=True)]
        _, recall, _ = scorer.score(captions, [reference.format(prompt=prompt) for prompt in prompts])
        return RewardOutput(recall, {"captions": captions})

    return reward


@register_reward("vlm_yes_no")
def vlm_yes_no(
    model: str = LLAVA,
    question: str = YES_NO_QUESTION,
    yes: str = "Yes",
    no: str = "No",
    prompt_template: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
) -> Reward:
    """Reward = sigmoid(logit(`yes`) - logit(`no`)) of the VLM's next token after `question`, in (0, 1).

    Args:
        model: image-text-to-text checkpoint (hub id or directory).
        question: asked about each image; "{prompt}" is replaced by the prompt.
        yes, no: the answer words, each one token of the model's tokenizer.
        prompt_template, device, dtype, batch_size: as `vlm_caption_bertscore`.
    """
    import torch

    if "{prompt}" not in question:
        raise ValueError(f"reward 'vlm_yes_no': question must contain '{{prompt}}', got {question!r}")
    vlm = VLM("vlm_yes_no", model, device, dtype, prompt_template)
    yes_id, no_id = vlm.token_id(yes), vlm.token_id(no)

    def reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> RewardOutput:
        questions = [question.format(prompt=prompt) for prompt in prompts]
        # Questions of equal token length go through the model together, so nothing is ever padded: with left
        # padding, position ids (and with them the logits) would depend on the batch for many architectures.
        by_length: dict[int, list[int]] = {}
        for index, text in enumerate(questions):
            by_length.setdefault(len(vlm.processor.tokenizer(vlm.text(text))["input_ids"]), []).append(index)
        scores = np.zeros(len(images), dtype=np.float32)
        with torch.inference_mode():
            for indices in by_length.values():
                for chunk in batches(indices, batch_size):
                    inputs = vlm.inputs([images[i] for i in chunk], [questions[i] for i in chunk])
                    logits = vlm.model(**inputs).logits[:, -1].float()
                    scores[chunk] = torch.sigmoid(logits[:, yes_id] - logits[:, no_id]).cpu().numpy()
        return RewardOutput(scores)

    return reward

