"""ddpo: reinforcement-learning post-training of text-to-image diffusion and flow models.

The Python API (`ddpo.api`), importable without loading torch until it is used:
`ddpo.train(config_or_path, reward=..., prompts=..., **overrides) -> RunResult`, `ddpo.load_config(...)`,
`ddpo.sample(model_or_run, prompts, ...)`, `ddpo.evaluate(run_dir, ...)`.

The trainer itself is `ddpo.training.Trainer`.
"""

__all__ = ["RunResult", "evaluate", "load_config", "sample", "train"]


def train(*args, **kwargs):
    """See `ddpo.api.train`."""
    from .api import train as train_

    return train_(*args, **kwargs)


def evaluate(*args, **kwargs):
    """See `ddpo.api.evaluate`."""
    from .api import evaluate as evaluate_

    return evaluate_(*args, **kwargs)


def sample(*args, **kwargs):
    """See `ddpo.api.sample`."""
    from .api import sample as sample_

    return sample_(*args, **kwargs)


def load_config(*args, **kwargs):
    """See `ddpo.api.load_config`."""
    from .api import load_config as load_config_

    return load_config_(*args, **kwargs)


def __getattr__(name: str):
    if name == "RunResult":
        from .api import RunResult

        return RunResult
    raise AttributeError(f"module 'ddpo' has no attribute {name!r}")
