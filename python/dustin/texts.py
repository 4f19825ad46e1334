# SPDX-License-Identifier: Apache-2.0
"""Public-domain long texts bundled with the package: the default prompt and evaluation texts."""

from __future__ import annotations

from importlib import resources

TEXT_NAMES = ("emma", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DEFAULT_PROMPT_TEXT = "prideprejudice"


def load_text(name: str) -> str:
    """Full text of one bundled Jane Austen novel (see ``data/texts/README.md``).

    Args:
      name: one of ``TEXT_NAMES``.

    Raises:
      ValueError: ``name`` is not a bundled text.
    """
    if name not in TEXT_NAMES:
        raise ValueError(f"load_text: name must be one of {TEXT_NAMES}, got {name!r}")
    return (
        resources.files("dustin")
        .joinpath("data", "texts", f"{name}.txt")
        .read_text(encoding="utf-8")
    )


def load_prompt_text(max_chars: int | None = None) -> str:
    """The default long prompt: Pride and Prejudice from its first line, ~161k Qwen2.5 tokens in full.

    Args:
      max_chars: keep only this many leading characters (callers usually cut the token window
        they need after tokenizing instead); None keeps the whole novel.

    Raises:
      ValueError: ``max_chars`` is not a positive integer or None.
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
        raise ValueError(
            f"load_prompt_text: max_chars must be a positive integer or None, got {max_chars!r}"
        )
    text = load_text(DEFAULT_PROMPT_TEXT)
    return text if max_chars is None else text[:max_chars]
