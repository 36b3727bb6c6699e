"""Judges of open answers: is the predicted answer a meaningful match for the reference answer?

Three kinds, chosen by `make_judge`: "rule" (a deterministic word-overlap matcher, for tests and sanity checks;
not comparable with the paper), "self" (the evaluated model, text only; biased towards its own answers and
flagged so), and "openai" (any OpenAI-compatible chat endpoint given by URL and model name: a hosted model,
or a local server such as vLLM or llama.cpp). The paper's group judged with gpt-35-turbo at temperature 0
and the prompt below.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from ..errors import InputError
from ..prompts import content_words

JUDGE_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases "
    "as valid matches.\n- Evaluate the correctness of the prediction compared to the answer.Please evaluate the "
    "following question-answer pair:\n\nQuestion: {question}\nCorrect Answer: {answer}\nPredicted Answer: {pred}"
    "\n\nProvide your evaluation only as a Yes/No.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION."
)
"""The published harness's judge prompt, verbatim (its missing spaces included)."""

API_KEY_VARIABLES = ("EGO_JUDGE_API_KEY", "OPENAI_API_KEY")


def read_verdict(reply: str) -> bool | None:
    """The published decision rule ("yes" anywhere -> correct, else "no" anywhere -> wrong); a reply with
    neither is None (counted as wrong and reported as unparsed)."""
    lowered = str(reply).lower()
    if "yes" in lowered:
        return True
    if "no" in lowered:
        return False
    return None


class RuleJudge:
    """Each clause of the reference (split at "and", ";" and ",") must share at least half of its content words
    with the prediction. Deterministic and offline; it only catches wording close to the reference."""

    spec = "rule"
    note = "rule-based word overlap: for tests and sanity checks, not comparable with the paper's GPT judge"

    def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool | None, str]:
        predicted = set(content_words(prediction.lower()))
        clauses = [c for c in _clauses(answer) if content_words(c.lower())]
        if not clauses:
            return None, "the reference answer has no content words"
        ok = all(
            len(set(content_words(c.lower())) & predicted) * 2 >= len(set(content_words(c.lower()))) for c in clauses
        )
        return ok, "overlap" if ok else "missing words"


def _clauses(text: str) -> list[str]:
    import re

    return [part for part in re.split(r"\band\b|[;,]", str(text)) if part.strip()]


class ModelJudge:
    """Asks the evaluated model itself, text only. Cheap and offline, but biased towards its own answers."""

    note = "the evaluated model judges its own answers (biased; not comparable with the paper)"

    def __init__(self, engine):
        self.engine = engine
        self.spec = f"self:{engine.model_id}"

    def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool | None, str]:
        prompt = JUDGE_PROMPT.format(question=question, answer=answer, pred=prediction)
        # The prompt holds a whole answer: the visitor's question cap (`max_question_chars`) is not the judge's.
        judging = self.engine.with_settings(
            max_question_chars=max(self.engine.settings.max_question_chars, len(prompt))
        )
        reply = judging.answer(prompt, max_new_tokens=4)
        return read_verdict(reply), str(reply)


class EndpointJudge:
    """Any OpenAI-compatible `/chat/completions` endpoint (standard library only). The key is read from the
    environment (EGO_JUDGE_API_KEY, else OPENAI_API_KEY) and never written anywhere."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0):
        if not url or not model:
            raise InputError(
                "An endpoint judge needs --judge-url (e.g. https://api.openai.com/v1) and "
                "--judge-model (e.g. gpt-3.5-turbo)."
            )
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.spec = f"openai:{model}@{url}"
        self.note = f"{model} through an OpenAI-compatible endpoint, temperature 0"

    def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool | None, str]:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "messages": [
                    {"role": "user", "content": JUDGE_PROMPT.format(question=question, answer=answer, pred=prediction)}
                ],
            }
        )
        headers = {"Content-Type": "application/json"}
        key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as error:
            raise InputError(
                f"The judge endpoint {self.url} answered HTTP {error.code}; check the URL, the model "
                f"name and the key in {' or '.join(API_KEY_VARIABLES)}."
            ) from error
        except (urllib.error.URLError, TimeoutError) as error:
            raise InputError(f"The judge endpoint {self.url} could not be reached ({error}); check the URL.") from error
        except (KeyError, IndexError, ValueError) as error:
            raise InputError(
                f"The judge endpoint {self.url} did not answer like an OpenAI-compatible chat API."
            ) from error
        return read_verdict(reply), str(reply)


def make_judge(kind: str, *, engine=None, url: str = "", model: str = ""):
    if kind == "rule":
        return RuleJudge()
    if kind == "self":
        if engine is None:
            raise InputError("--judge self needs the evaluated model; give --model.")
        return ModelJudge(engine)
    if kind == "openai":
        return EndpointJudge(url, model)
    raise InputError(f"--judge must be rule, self or openai; got {kind!r}.")
