"""The config tree: TOML + overrides, round trips, error messages that name the key, batch arithmetic."""

import dataclasses

import pytest

from ddpo.config import (
    Config,
    ConfigError,
    TrainConfig,
    available_presets,
    config_to_dict,
    save_config,
)
from ddpo.training.assemble import derived_batch_sizes, load_config, validate


def test_defaults_are_valid_and_are_the_papers():
    config = load_config()
    validate(config)
    assert config == Config()
    assert (config.sample.num_steps, config.sample.eta, config.sample.guidance_scale) == (50, 1.0, 5.0)
    assert (config.train.lr, config.train.clip_range, config.train.adv_clip_max) == (3e-4, 1e-4, 5.0)


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[train]\nlr = 1e-4\nalgorithm = "rwr"\n'
        '[model]\nlora_target_modules = ["to_q", "to_v"]\n'
        '[reward.kwargs]\nquality = 90\n'
        '[log]\nwith = "wandb"\n'
    )
    config = load_config(
        path,
        [
            "sample.num_steps=20",
            'model.lora_target_modules=["to_q"]',
            "train.algorithm=ddpo_is",  # a bare word is a string
            "run_name=2024",  # a string field keeps digits as text
            "train.adam_epsilon=1",  # an int is accepted for a float field
            "reward.kwargs.quality=80",
        ],
    )
    assert config.train.lr == 1e-4  # from the file
    assert config.sample.num_steps == 20
    assert config.model.lora_target_modules == ["to_q"]
    assert config.train.algorithm == "ddpo_is"
    assert config.run_name == "2024"
    assert config.train.adam_epsilon == 1.0 and isinstance(config.train.adam_epsilon, float)
    assert config.reward.kwargs == {"quality": 80}
    assert config.log.with_ == ["wandb"]  # `log.with` may be one string


def test_save_then_load_round_trips_exactly(tmp_path):
    config = load_config(
        overrides=[
            "seed=7",
            "train.lr=1.5e-5",
            "train.timestep_fraction=0.3",
            "log.with=[]",
            'reward.terms=[{name="jpeg_compressibility", weight=0.5}, '
            '{name="jpeg_incompressibility", weight=2.0, kwargs={quality=80}}]',
            'prompts.eval_prompts=["a cat", "an ant"]',
        ]
    )
    path = tmp_path / "config.toml"
    save_config(config, path)
    assert "\nwith = []\n" in path.read_text()  # the key users write, not the Python field name
    assert load_config(path) == config
    assert config_to_dict(load_config(path)) == config_to_dict(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-4", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1e-4", "unknown config section 'trian' (did you mean 'train'?)"),
        ("train.eta=0.5", "unknown config key 'train.eta' (did you mean 'sample.eta'?)"),
    ],
)
def test_unknown_key_suggests_the_nearest(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value) == message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[sample]\nnum_step = 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = "typo.toml: unknown config key 'sample.num_step' (did you mean 'sample.num_steps'?)"
    assert str(error.value).endswith(message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=ten", "train.epochs must be an int, got str 'ten'"),
        ("train.epochs=true", "train.epochs must be an int, got bool True"),
        ("train.lr=fast", "train.lr must be a number, got str 'fast'"),
        ("model.use_lora=1", "model.use_lora must be a bool (true or false), got int 1"),
        ("model.lora_target_modules=[1]", "model.lora_target_modules[0] must be a string, got int 1"),
    ],
)
def test_wrong_type_names_key_and_value(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value) == message


def test_validate_checks_types_of_configs_built_in_python():
    config = dataclasses.replace(Config(), train=TrainConfig(epochs="ten"))
    with pytest.raises(ConfigError, match="train.epochs must be an int, got str 'ten'"):
        validate(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.height=500"], "sample.height=500 is not a multiple of 8"),
        (["sample.eta=0"], "sample.eta=0 makes the DDIM policy deterministic; its log-probability is undefined"),
        (["train.algorithm=ddpo_sf", "train.inner_epochs=2"], "train.inner_epochs=2 is not allowed with ddpo_sf"),
        (["train.algorithm=ppo"], "train.algorithm='ppo' is not valid"),
        (["train.timestep_fraction=0"], r"train.timestep_fraction=0 must be in \(0, 1\]"),
        (["model.mixed_precision=fp8"], "model.mixed_precision='fp8' is not valid"),
        (["prompts.source=imagenet_animal"], "prompts.source: unknown prompt source .* 'imagenet_animals'"),
        (["prompts.source=file"], "prompts.source='file' needs prompts.file"),
        (["reward.name=jpeg_compresibility"], "reward.name: unknown reward .* 'jpeg_compressibility'"),
        (["reward.kwargs.qualty=80"], "reward.kwargs: reward 'jpeg_compressibility' does not accept .*qualty"),
    ],
)
def test_invalid_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_eta_zero_is_allowed_for_the_ddpm_sampler():
    assert load_config(overrides=["sample.scheduler=ddpm", "sample.eta=0"]).sample.eta == 0.0


@pytest.mark.parametrize("name", ["sd_compressibility", "sd_incompressibility"])
def test_presets_load_by_name_with_the_papers_batch(name):
    assert name in available_presets()
    config = load_config(name)
    assert config.model.pretrained == "CompVis/stable-diffusion-v1-4"
    assert config.reward.name == name.replace("sd_", "jpeg_")
    assert config.prompts.source == "imagenet_animals"
    sizes = derived_batch_sizes(config, num_processes=8)
    assert sizes.samples_per_epoch == 256
    assert sizes.optimizer_steps_per_epoch == 4


def test_overrides_apply_over_a_preset_and_a_base():
    preset = load_config("sd_compressibility")
    config = load_config(overrides=["train.epochs=3"], base=preset)
    assert config.train.epochs == 3 and config.train.gradient_accumulation_steps == 2
    assert preset.train.epochs == 100  # the base is not modified


def test_missing_config_lists_presets():
    with pytest.raises(ConfigError, match="'nope.toml' is neither a file nor a preset .*sd_compressibility"):
        load_config("nope.toml")


def test_derived_batch_sizes_arithmetic():
    config = load_config(
        overrides=[
            "sample.batch_size=4",
            "sample.num_batches_per_epoch=2",
            "sample.num_steps=50",
            "train.timestep_fraction=0.5",
            "train.batch_size=2",
            "train.gradient_accumulation_steps=2",
            "train.inner_epochs=3",
        ]
    )
    assert dataclasses.asdict(derived_batch_sizes(config, num_processes=3)) == {
        "num_processes": 3,
        "samples_per_epoch": 24,
        "anchor_samples_per_epoch": 0,
        "samples_per_process": 8,
        "num_train_timesteps": 25,
        "minibatches_per_epoch": 4,
        "accumulation_steps": 2,
        "samples_per_optimizer_step": 12,
        "optimizer_steps_per_epoch": 6,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.sde_window=-1"], "sample.sde_window=-1 must be >= 0"),
        (["sample.num_steps=10", "sample.sde_window=11"], "sample.sde_window=11 exceeds sample.num_steps=10"),
        (
            ["train.algorithm=fdfo", "sample.samples_per_prompt=2", "sample.sde_window=2"],
            "sample.sde_window=2 needs the SDE sampler, but train.algorithm='fdfo' samples with 'churn' steps",
        ),
    ],
)
def test_a_bad_sde_window_is_a_one_line_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(overrides=overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("window", "fraction", "trained"), [(3, 0.99, 3), (3, 0.5, 2), (2, 0.1, 1), (10, 1.0, 10)])
def test_with_an_sde_window_only_its_steps_are_trained(window, fraction, trained):
    """Flow-GRPO-Fast: the trained steps per sample are timestep_fraction of the window, rounded up (flow_grpo
    trains the whole window), not of sample.num_steps."""
    config = load_config(overrides=["sample.num_steps=10", f"sample.sde_window={window}", f"train.timestep_fraction={fraction}"])
    assert derived_batch_sizes(config, num_processes=1).num_train_timesteps == trained


def test_score_function_takes_one_step_per_epoch():
    config = load_config(
        overrides=["train.algorithm=ddpo_sf", "train.batch_size=2", "train.timestep_fraction=0.001"]
    )
    sizes = derived_batch_sizes(config, num_processes=2)
    assert sizes.optimizer_steps_per_epoch == 1
    assert sizes.accumulation_steps == sizes.minibatches_per_epoch == 16
    assert sizes.num_train_timesteps == 1  # never zero


def test_batch_divisibility_error_names_both_keys():
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["sample.batch_size=5", "sample.num_batches_per_epoch=1", "train.batch_size=2"])
    assert "train.batch_size=2" in str(error.value) and "sample.batch_size=5" in str(error.value)
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps=3 must divide the 32 micro-batches"):
        load_config(overrides=["train.gradient_accumulation_steps=3"])
