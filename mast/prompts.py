"""How a problem becomes model input, shared by every stage that touches text.

Evaluation, unlearning, the coupling signal, the diagnostics and the toy's training all go
through these functions, so the forget texts a model is unlearned on are exactly the
prompts it is evaluated on followed by the solution.
"""

from __future__ import annotations

from collections.abc import Callable

from mast.config import BOXED_INSTRUCTION


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def plain(tokenizer, question: str) -> str:
    """For base models without a chat template."""
    return f"Question: {question}\n{BOXED_INSTRUCTION}\nAnswer:"


def qwen_boxed(tokenizer, question: str) -> str:
    """Qwen2.5-Math's official prompt: the boxed instruction as the system message."""
    if not _has_chat_template(tokenizer):
        return plain(tokenizer, question)
    return _chat(tokenizer, [{"role": "system", "content": BOXED_INSTRUCTION}, {"role": "user", "content": question}])


def boxed_user(tokenizer, question: str) -> str:
    """DeepSeek-R1-Distill / DeepScaleR style: no system prompt, instruction after the question."""
    if not _has_chat_template(tokenizer):
        return plain(tokenizer, question)
    return _chat(tokenizer, [{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}])


TEMPLATES: dict[str, Callable] = {"qwen_boxed": qwen_boxed, "boxed_user": boxed_user, "plain": plain}


def format_prompt(tokenizer, question: str, template: str = "qwen_boxed") -> str:
    return TEMPLATES[template](tokenizer, question)


def completion_text(tokenizer, solution: str) -> str:
    """The training target after a prompt: the solution, closed by the end-of-turn token."""
    eos = tokenizer.eos_token or ""
    return solution if solution.endswith(eos) else solution + eos


def tokenize_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion and a 0/1 mask that is 1 on completion tokens only.

    Prompt and completion are tokenized separately so the boundary is exact. Truncation
    keeps the whole prompt when it can and cuts the completion's tail.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (p + c)[:max_length]
    mask = ([0] * len(p) + [1] * len(c))[:max_length]
    return ids, mask


def problem_pair(tokenizer, problem: dict, template: str = "qwen_boxed", max_length: int = 1024):
    """(input_ids, completion_mask) for a problem record `{"prompt", "solution"}`."""
    prompt = format_prompt(tokenizer, problem["prompt"], template)
    return tokenize_pair(tokenizer, prompt, completion_text(tokenizer, problem["solution"]), max_length)
