"""The chat template, built from token ids (never from text), so special tokens cannot be forged by data.

    <s> <|user|> {prompt} <|end|> <|assistant|> {response} <|end|> </s>

The special tokens are reserved in every dsjax tokenizer (dsjax.data.tokenizer.CHAT_TOKENS),
so a pretrained checkpoint fine-tunes on this template with no vocabulary change. Loss
(SFT) and policy gradient (GRPO) apply to the response and its closing <|end|> </s> only.
"""

from __future__ import annotations

import numpy as np

from dsjax.data.tokenizer import CHAT_TOKENS, Tokenizer


class ChatTokens:
    """The template's special ids, looked up in the tokenizer (an old tokenizer without them is refused)."""

    def __init__(self, tokenizer: Tokenizer):
        ids = [tokenizer.sp.piece_to_id(piece) for piece in CHAT_TOKENS]
        unk = tokenizer.sp.unk_id()
        missing = [piece for piece, i in zip(CHAT_TOKENS, ids) if i == unk]
        if missing:
            from dsjax.data.tokenizer import TokenizerError

            raise TokenizerError(
                f"{tokenizer.path} has no chat tokens ({', '.join(missing)}): it was trained before dsjax reserved "
                "them; pretrain again with the current dsjax to post-train"
            )
        self.user, self.assistant, self.end = ids
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id


def prompt_ids(tokenizer: Tokenizer, prompt: str, chat: ChatTokens | None = None) -> list[int]:
    """The tokens a model sees before it answers: <s> <|user|> prompt <|end|> <|assistant|>."""
    chat = chat or ChatTokens(tokenizer)
    return [chat.bos, chat.user, *tokenizer.encode(prompt), chat.end, chat.assistant]


def response_ids(tokenizer: Tokenizer, response: str, chat: ChatTokens | None = None) -> list[int]:
    """The answer and what closes it: response <|end|> </s>."""
    chat = chat or ChatTokens(tokenizer)
    return [*tokenizer.encode(response), chat.end, chat.eos]


def training_row(prompt: list[int], response: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One SFT example as (tokens [seq_len + 1] int32, weights [seq_len] float32).

    weights[i] = 1 where tokens[i + 1] (the target of position i) is a response token;
    the prompt and the padding carry no loss. A response longer than the window is cut
    (its end tokens are then not learned from this example).
    """
    ids = (prompt + response)[: seq_len + 1]
    tokens = np.full(seq_len + 1, pad_id, np.int32)
    tokens[: len(ids)] = ids
    weights = np.zeros(seq_len, np.float32)
    weights[len(prompt) - 1 : len(ids) - 1] = 1.0
    return tokens, weights
