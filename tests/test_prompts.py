"""Prompt sources: the paper's lists, articles, files, determinism."""

import random

import pytest

from ddpo.prompts import PromptSourceError, available_prompt_sources, build_prompt_source, with_indefinite_article


def test_simple_animals_are_the_45_of_the_paper():
    source = build_prompt_source("simple_animals")
    assert len(source.prompts) == len(set(source.prompts)) == 45
    assert {"a cat", "a dog", "a hedgehog", "a kangaroo", "an ant"} <= set(source.prompts)


def test_imagenet_animals_are_the_398_animal_classes_as_the_paper_prompted_them():
    source = build_prompt_source("imagenet_animals")
    assert len(source.prompts) == 398
    assert source.prompts[0] == "tench, Tinca tinca"  # the full label, as both reference implementations
    assert source.prompts[-1] == "puffer, pufferfish, blowfish, globefish"  # class 397; 398 is "abacus"
    assert "otter" in source.prompts
    prompt, metadata = source(random.Random(0))
    assert source.prompts[metadata["class_index"]] == prompt
    assert prompt.startswith(metadata["animal"])


@pytest.mark.parametrize(
    ("noun", "phrase"),
    [("elephant", "an elephant"), ("otter", "an otter"), ("ant", "an ant"), ("cat", "a cat"),
     ("unicorn", "a unicorn"), ("hour", "an hour"), ("European robin", "a European robin")],
)
def test_indefinite_article(noun, phrase):
    assert with_indefinite_article(noun) == phrase


def test_animals_activities_are_all_135_pairs_with_metadata():
    source = build_prompt_source("animals_activities")
    assert len(set(source.prompts)) == 135
    assert {"a dog riding a bike", "an ant playing chess", "a hedgehog washing the dishes"} <= set(source.prompts)
    rng = random.Random(3)
    for _ in range(20):
        prompt, metadata = source(rng)
        assert prompt == f"{with_indefinite_article(metadata['animal'])} {metadata['activity']}"


def test_file_source_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red cube \n\n\na blue ball\n   \n")
    source = build_prompt_source("file", file=str(path))
    assert source.prompts == ["a red cube", "a blue ball"]
    assert source(random.Random(0))[0] in source.prompts


def test_empty_or_missing_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "x.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"prompt file '{empty}' contains no prompts"):
        build_prompt_source("file", file=str(empty))
    with pytest.raises(PromptSourceError, match="prompt file '.*missing.txt' does not exist"):
        build_prompt_source("file", file=str(tmp_path / "missing.txt"))


def test_unknown_source_suggests_the_nearest():
    assert {"simple_animals", "imagenet_animals", "animals_activities", "file"} <= set(available_prompt_sources())
    with pytest.raises(ValueError, match="did you mean 'simple_animals'"):
        build_prompt_source("simple_animal")


@pytest.mark.parametrize("name", ["simple_animals", "imagenet_animals", "animals_activities"])
def test_draws_are_deterministic_given_the_rng(name):
    source = build_prompt_source(name)
    first = [source(random.Random(42)) for _ in range(2)]
    assert first[0] == first[1]
    rng_a, rng_b = random.Random(1), random.Random(1)
    draws_a = [source(rng_a) for _ in range(30)]
    assert draws_a == [source(rng_b) for _ in range(30)]
    assert len({prompt for prompt, _ in draws_a}) > 5  # and not constant
