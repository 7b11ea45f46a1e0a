"""Reasoning models' thinking, split from their answer: `message.reasoning_content` and
`message.content` of /v1/chat/completions (and `delta.reasoning_content` when streaming).

Models that think write it between `<think>` and `</think>` (Qwen3, QwQ, DeepSeek-R1 and their
distillations). Where the reply starts is read from the rendered prompt, so one rule serves
every such template:
- the prompt leaves a `<think>` open (DeepSeek-R1's and Qwen3-2507-Thinking's templates write it
  themselves): the reply starts inside the thinking and `</think>` ends it; a reply cut before
  `</think>` is all reasoning;
- otherwise (Qwen3's template; with `enable_thinking: false` it writes an empty, closed block) the
  reply is thinking only where it opens with `<think>`; a reply that does not is all content.

The thinking and the answer are given without the whitespace around them; nothing is lost but
that whitespace and the two tags. A request held by a grammar (response_format, structured
outputs, tool_choice "required") writes what its grammar allows from its first token, so it starts
as content whatever the prompt says: its tags, if the grammar has any, still split it.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("auto", "think", "qwen3", "deepseek_r1", "none")  # qwen3 / deepseek_r1: vLLM's names for think


def reasoning_enabled(parser: str | None, chat_template: str | None) -> bool:
    """Whether replies are split: `think` (and vLLM's names for it) always, `none` never, `auto`
    (the default) when the model's chat template writes `</think>`."""
    if parser in (None, "auto"):
        return chat_template is not None and END in chat_template
    return parser != "none"


def opens_in_reasoning(prompt: str) -> bool:
    """Whether a reply to this rendered prompt starts inside a thinking block the prompt opened."""
    return prompt.rfind(START) > prompt.rfind(END)


def _tail_of(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_reasoning(text: str, opened: bool, final: bool = True) -> tuple[str, str]:
    """(reasoning, content) of a reply; `opened`: the prompt left a thinking block open. Not
    `final` (mid-stream): only what later text cannot change, so each part only ever grows."""
    if not opened:
        head = text.lstrip()
        if not head.startswith(START):
            if not final and START.startswith(head):
                return "", ""  # the reply may still open with <think>
            return "", text
        text = head[len(START):]
    at = text.find(END)
    if at < 0:
        if not final:  # hold back a tail that may be the start of </think>, and trailing space
            return text[: len(text) - _tail_of(text, END)].strip(), ""
        return text.strip(), ""
    return text[:at].strip(), text[at + len(END):].lstrip()


class ReasoningStreamer:
    """A streamed reply's text in, (reasoning delta, content delta) out."""

    def __init__(self, opened: bool):
        self.opened = opened
        self.text = ""
        self.sent = (0, 0)  # characters of reasoning and of content given out

    def _diff(self, final: bool) -> tuple[str, str]:
        reasoning, content = split_reasoning(self.text, self.opened, final)
        r, c = self.sent
        self.sent = (max(r, len(reasoning)), max(c, len(content)))
        return reasoning[r:], content[c:]

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._diff(final=False)

    def finish(self) -> tuple[str, str]:
        """What is left at the end of the reply."""
        return self._diff(final=True)
