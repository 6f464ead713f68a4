"""The tokenizer of a sim model folder: its own when it has one, else :class:`NullTokenizer`."""

from __future__ import annotations

from pathlib import Path


class NullTokenizer:
    """Stands in when a sim model folder has only ``config.json``: ``input_ids`` requests work,
    text gets a 400 naming the cause. Output ids decode to ``" <id>"`` each, so stop strings and
    streamed text still behave deterministically."""

    path: str = ""
    chat_templates: dict[str, str] = {}
    vocab_size = 0
    bos_token_id = None
    eos_token_id = None
    pad_token_id = None
    all_special_ids: list[int] = []

    def __init__(self, path: str | Path = "") -> None:
        self.path = str(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise _no_tokenizer(f"text input needs a tokenizer and the simulated model at {self.path} has none "
                            "(no tokenizer.json): send input_ids instead")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [str(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return int(token) if token.isdigit() else None

    def get_chat_template(self, name=None, tools=None) -> str:
        raise _no_tokenizer(f"chat requests need a tokenizer and the simulated model at {self.path} has none "
                            "(no tokenizer.json): use /generate or /v1/completions with token ids")

    def apply_chat_template(self, *args, **kwargs):
        self.get_chat_template()


def open_tokenizer(path: str | Path, simulate: bool):
    """The folder's tokenizer; in sim mode a folder without ``tokenizer.json`` gets :class:`NullTokenizer`."""
    from pdserve.models.tokenizer import Tokenizer

    if simulate and not (Path(path) / "tokenizer.json").is_file():
        return NullTokenizer(path)
    return Tokenizer(path)


def _no_tokenizer(message: str) -> Exception:
    from pdserve.server.errors import ServerError

    return ServerError(400, message, param="text")
