"""Prompt sources: where the prompts of each sampling batch come from.

A source is a callable `source(rng) -> (prompt, metadata)` with a `prompts` attribute listing every prompt
it can return (for evaluation and sample grids). Sources are registered by name, and `prompts.source` in the
config names one. The built-in sources reproduce the prompt distributions of Black et al. 2023
(arXiv 2305.13301, Sec. 6), read from the lists their code shipped (`data/prompts/ATTRIBUTION.md`):

- `simple_animals`: the 45 common animals of the aesthetic-quality task, e.g. "cat".
- `imagenet_animals`: the 398 animal classes of ImageNet-1000 (compressibility, incompressibility), each
  prompt the full class label, e.g. "tench, Tinca tinca".
- `animals_activities`: "a(n) [animal] [activity]", 45 animals x 3 activities (prompt-image alignment).
- `file`: one prompt per line of a text file.

Prompt text follows the authors' code rather than a tidier form: the paper states only "a(n) [animal]
[activity]" for the alignment task, and both of its public implementations (jannerm/ddpo in JAX and
kvablack/ddpo-pytorch) prompt the other tasks with the bare list entry, ImageNet's synonyms and Latin name
included. Keeping the exact strings keeps reward curves comparable with the paper's.

The Shapes world (`ddpo.shapes`) registers its `shapes_*` sources when imported; a name not registered
yet triggers that import once.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Protocol

from ddpo.registry import Registry

NUM_IMAGENET_ANIMALS = 398
"""ImageNet-1000 classes 0..397 are animals; the paper samples compressibility prompts from all of them."""

_PLUGIN_PACKAGES = ("ddpo.shapes",)
"""Packages that register more sources on import; imported once when a name is not found."""


class PromptSourceError(ValueError):
    """A prompt source is unknown, misconfigured, or has no prompts; the message names it."""


class PromptSource(Protocol):
    """Draws one prompt per call; deterministic given the state of `rng`."""

    prompts: list[str]
    """Every prompt this source can return, in a fixed order (for evaluation and sample grids)."""

    def __call__(self, rng: random.Random) -> tuple[str, dict]:
        """Return a prompt and its metadata (a JSON-serialisable dict handed to the reward)."""
        ...


@dataclass
class ListPromptSource:
    """Uniform choice from a fixed list of prompts, each with its own metadata."""

    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)
    """One dict per prompt; empty means `{}` for every prompt."""

    def __call__(self, rng: random.Random) -> tuple[str, dict]:
        index = rng.randrange(len(self.prompts))
        return self.prompts[index], (dict(self.metadata[index]) if self.metadata else {})


PromptSourceFactory = Callable[..., PromptSource]
SOURCES: Registry[PromptSourceFactory] = Registry("prompt source", _PLUGIN_PACKAGES, PromptSourceError)


def register_prompt_source(name: str, *, heldout_source: str | None = None, heldout_reward: str | None = None) -> Callable[[PromptSourceFactory], PromptSourceFactory]:
    """Decorator registering `factory() -> PromptSource` under `name` (the value of `prompts.source`).

    Args:
        heldout_source: the registered source of its unseen prompts (evaluation's held-out group), if any.
        heldout_reward: the scorer the evaluation judges its samples with by default (`log.heldout_reward`).
    """
    return SOURCES.register(name, heldout_source=heldout_source, heldout_reward=heldout_reward)


def available_prompt_sources() -> list[str]:
    """Names of all registered prompt sources, the Shapes world's included."""
    return SOURCES.names()


def prompt_source_factory(name: str) -> PromptSourceFactory:
    """The factory registered as `name`.

    Raises:
        PromptSourceError: `name` is not registered; the message suggests the nearest registered name.
    """
    if name not in SOURCES:
        raise SOURCES.unknown(name, "available")
    return SOURCES.get(name)


def reads_file(factory: PromptSourceFactory) -> bool:
    """Whether a source factory takes a prompt file (the `file` keyword, from `prompts.file`)."""
    return "file" in inspect.signature(factory).parameters


def build_prompt_source(name: str, file: str = "") -> PromptSource:
    """The source registered as `name`; `file` is the prompt file of a source that reads one (`file`).

    Raises:
        ValueError: `name` is not registered, or `file` is given to a source that reads no file.
    """
    factory = prompt_source_factory(name)
    if not file:
        return factory()
    if not reads_file(factory):
        raise PromptSourceError(f"prompt source {name!r} reads no file; leave prompts.file empty")
    return factory(file=file)


def with_indefinite_article(noun: str) -> str:
    """`noun` with the indefinite article English uses: "a cat", "an ant", "an elephant", "a unicorn".

    Decided by spelling, with the exceptions where spelling and sound disagree ("an hour", "a European");
    enough for animal and object names without a pronunciation dictionary.
    """
    word = noun.lower()
    if word.startswith(("hour", "honest", "honor", "heir")):
        return f"an {noun}"
    if word.startswith(("uni", "use", "usu", "uti", "eu", "ewe", "one")):
        return f"a {noun}"
    return f"{'an' if word[:1] in {'a', 'e', 'i', 'o', 'u'} else 'a'} {noun}"


@functools.cache
def _data_lines(name: str) -> tuple[str, ...]:
    """Non-blank, stripped lines of a list shipped in `ddpo/data/prompts/`."""
    text = resources.files("ddpo").joinpath("data", "prompts", name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@register_prompt_source("simple_animals")
def simple_animals() -> ListPromptSource:
    """The 45 common animals of the paper's aesthetic-quality task as "a(n) [animal]", e.g. "a cat"."""
    animals = list(_data_lines("simple_animals.txt"))
    return ListPromptSource([with_indefinite_article(a) for a in animals], [{"animal": animal} for animal in animals])


@register_prompt_source("imagenet_animals")
def imagenet_animals() -> ListPromptSource:
    """The 398 ImageNet animal classes, each prompt the full label, e.g. "tench, Tinca tinca".

    Metadata holds the class index and the label's first name ("tench").
    """
    labels = list(_data_lines("imagenet_classes.txt")[:NUM_IMAGENET_ANIMALS])
    metadata = [{"class_index": index, "animal": label.split(",")[0]} for index, label in enumerate(labels)]
    return ListPromptSource(labels, metadata)


@register_prompt_source("animals_activities")
def animals_activities() -> ListPromptSource:
    """Each of the 45 animals with each of the 3 activities, e.g. "a dog riding a bike" (135 prompts)."""
    animals, activities = _data_lines("simple_animals.txt"), _data_lines("activities.txt")
    pairs = [(animal, activity) for animal in animals for activity in activities]
    prompts = [f"{with_indefinite_article(animal)} {activity}" for animal, activity in pairs]
    return ListPromptSource(prompts, [{"animal": animal, "activity": activity} for animal, activity in pairs])


@register_prompt_source("file")
def prompt_file(file: str = "") -> ListPromptSource:
    """One prompt per line of `file` (UTF-8); lines are stripped and blank lines skipped.

    Raises:
        ValueError: no file was given, or it holds no prompts.
    """
    if not file:
        raise PromptSourceError("prompt source 'file' needs prompts.file: a text file with one prompt per line")
    return ListPromptSource(read_prompt_lines(file, "prompts.file"))


def read_prompt_lines(path: str | Path, key: str) -> list[str]:
    """Non-blank stripped lines of a UTF-8 prompt file; errors name the file and the option or key (`key`)
    it came from.

    Raises:
        PromptSourceError: the file does not exist or holds no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSourceError(f"{key}: prompt file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PromptSourceError(f"{key}: prompt file '{path}' is not UTF-8 (line {line}: byte 0x{path.read_bytes()[error.start]:02x}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptSourceError(f"{key}: prompt file '{path}' contains no prompts")
    return prompts
