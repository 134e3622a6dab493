"""The one error type of bad configuration input."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config could not be loaded; ``problems`` holds one line per problem, each naming the
    file (or object) and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
