"""ddpo: reinforcement-learning post-training of text-to-image diffusion and flow models.

The Python API (`ddpo.api`), importable without loading torch until it is used:
`ddpo.train(config_or_path, reward=..., prompts=..., **overrides) -> RunResult`, `ddpo.load_config(...)`,
`ddpo.sample(model_or_run, prompts, ...)`, `ddpo.evaluate(run_dir, ...)`.

`ddpo.train` and `ddpo.evaluate` stay callable after the modules of the same names are imported (`ddpo.train.Trainer`
is the trainer class): see `_Package`.
"""

import sys
import types

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


class _CallableModule(types.ModuleType):
    """The modules `ddpo.train` and `ddpo.evaluate`, callable as the API functions of the same names."""

    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    """Importing the submodule `ddpo.train` (or `ddpo.evaluate`) makes it the package attribute of that name,
    in place of the API function: the module is made callable as that function, so `ddpo.train(...)`,
    `ddpo.train.Trainer` and `mock.patch("ddpo.train.Trainer")` all work."""

    def __setattr__(self, name, value):
        if name in ("train", "evaluate") and isinstance(value, types.ModuleType):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
