"""What the command line reports as bad input: one line `ddpo: error: ...`, exit status 2, never a traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input: printed as one line `ddpo: error: ...`, exit status 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ddpo: error: {self.format_message()}", err=True)


def user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .policy import PolicyLoadError
    from .prompts import PromptSourceError
    from .rewards import RewardError
    from .rewards.remote import RemoteRewardError
    from .training.evaluate import EvaluationError
    from .algorithms import OffPolicyError
    from .training.run_directory import RunDirectoryError

    # FloatingPointError: training stopped on a non-finite loss before the update reached the weights.
    # RemoteRewardError: a reward server that stopped answering during the run (at start-up it is a ConfigError).
    return (ConfigError, EvaluationError, PolicyLoadError, PromptSourceError, RewardError, RunDirectoryError, FileNotFoundError, FloatingPointError, OffPolicyError, RemoteRewardError)
