"""Chat prompts: the model's chat template renders a conversation, and what callers wrote stays data.

The template's own markup (`<|user|>`, BOS, EOS) becomes the special tokens it
names; a message's content never does. Without this, a user who writes
`<|assistant|>` or `<|endoftext|>` in a message gets those control tokens in
the prompt and can forge the assistant's or the system's turn. Raw prompts
(`GenerateRequest.prompt`, Tokenize) keep special-token text as special
tokens on purpose: a caller who writes a prompt by hand may mean them.
"""

from __future__ import annotations

from typing import Any

from .base import InvalidRequestError

Messages = tuple[tuple[str, str], ...]


def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The text of every special token the tokenizer would turn into its control token."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return tuple(sorted({token.content for token in added.values() if getattr(token, "special", False)}))


def render(tokenizer: Any, messages: Messages) -> str:
    """A conversation as prompt text: the chat template with a generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("messages", "this model has no chat template; send a prompt instead")
    try:
        text = tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as exc:  # the template's own checks (jinja raise_exception) name the problem
        raise InvalidRequestError("messages", f"the chat template rejected them: {exc}") from exc
    return str(text)


def _marker(index: int) -> str:
    # Private-use characters around a number: no tokenizer's special token,
    # and no text a caller could have sent in the same request by accident.
    return f"\ue000{index}\ue001"


def pieces(tokenizer: Any, messages: Messages, specials: tuple[str, ...]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_data) pieces, in order: markup the template
    wrote (False) and the messages' contents (True).

    One markup piece, the whole text, when no content spells a special token
    (then nothing needs keeping apart). Otherwise the template is rendered a
    second time with a marker in place of each content, and each marker's
    place is where that content went; a template that trims contents is
    followed. A template that changes contents in other ways cannot be
    followed: then a content that spells a special token is refused.

    Raises:
        InvalidRequestError: as above, naming the message.
    """
    text = render(tokenizer, messages)
    suspect = [i for i, (_, content) in enumerate(messages) if any(s in content for s in specials)]
    if not suspect:
        return [(text, False)]
    marked = render(tokenizer, tuple((role, _marker(i)) for i, (role, _) in enumerate(messages)))
    for strip in (False, True):
        found: list[tuple[str, bool]] = []
        rest = marked
        for i, (_, content) in enumerate(messages):
            before, marker, rest = rest.partition(_marker(i))
            if not marker:
                break
            found += [(before, False), (content.strip() if strip else content, True)]
        else:
            found.append((rest, False))
            if "".join(piece for piece, _ in found) == text:
                return [piece for piece in found if piece[0]]
    raise InvalidRequestError(
        f"messages[{suspect[0]}].content",
        "spells a special token, and this model's chat template changes message contents, so it cannot "
        "be kept as text: remove the special-token text",
    )
