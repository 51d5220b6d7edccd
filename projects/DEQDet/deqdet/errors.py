"""Errors caused by the user's input (files, configs), reported as one clear line by the CLIs."""

__all__ = ["NonFiniteLossError", "UserInputError", "one_line"]


class UserInputError(Exception):
    """Bad input from the user: the message names the file or config key at fault."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the message names the non-finite loss terms and the iteration."""


def one_line(error: Exception) -> str:
    """The error's message on one line. An error raised in a DataLoader worker reaches the main
    process with the worker's traceback in its message; only its last line is the message."""
    last_line = str(error).strip().splitlines()[-1]
    return last_line.split("UserInputError: ", 1)[-1]
