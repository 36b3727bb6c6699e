"""Judges of open answers: is the predicted answer a meaningful match for the reference answer?

Three kinds, chosen by `make_judge`: "rule" (a deterministic word-overlap matcher, for tests and sanity checks;
not comparable with the paper), "self" (the evaluated model, text only; biased towards its own answers and
flagged so), and "openai" (any OpenAI-compatible chat endpoint given by URL and model name: a hosted model,
or a local server such as vLLM or llama.cpp). The paper's group judged with gpt-35-turbo at temperature 0
and the prompt below.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request

from ..errors import InputError
from ..prompts import content_words
from .scoring import parse_yes_no

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
    with the prediction; a reference that is only "yes" or "no" is matched by the prediction's own yes or no.
    Deterministic and offline; it only catches wording close to the reference."""

    spec = "rule"
    note = "rule-based word overlap: for tests and sanity checks, not comparable with the paper's GPT judge"

    def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool | None, str]:
        expected = parse_yes_no(answer)
        if expected is not None and set(content_words(str(answer).lower())) <= {"yes"}:  # "No.", "Yes": a yes/no
            said = parse_yes_no(prediction)
            return (None, "the prediction says neither yes nor no") if said is None else (said == expected, "yes/no")
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


RETRIED_HTTP_STATUSES = frozenset({429, 500, 502, 503, 504})
PROBE_TIMEOUT_S = 20.0
"""How long the probe before a run waits for the judge's one answer (twice at most)."""
"""Answers of an endpoint that a later try may not get: rate limited (429) or a server in trouble (5xx)."""


class EndpointJudge:
    """Any OpenAI-compatible `/chat/completions` endpoint (standard library only). The key is read from the
    environment (EGO_JUDGE_API_KEY, else OPENAI_API_KEY) and never written anywhere. A request that is rate limited
    (HTTP 429), meets a server error (5xx) or times out is tried again after a wait that doubles each time (or the
    one the server's Retry-After asks, up to `max_wait_s`), `tries` times in all."""

    def __init__(
        self,
        url: str,
        model: str,
        timeout_s: float = 60.0,
        tries: int = 5,
        first_wait_s: float = 2.0,
        max_wait_s: float = 60.0,
    ):
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
        self.tries, self.first_wait_s, self.max_wait_s = tries, first_wait_s, max_wait_s
        self.spec = f"openai:{model}@{url}"
        self.note = f"{model} through an OpenAI-compatible endpoint, temperature 0"

    def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool | None, str]:
        reply = self._complete(JUDGE_PROMPT.format(question=question, answer=answer, pred=prediction))
        return read_verdict(reply), reply

    def probe(self) -> None:
        """One request, so that a wrong URL, model name or key is told before a model loads for the run, not at its
        first open answer; within about a minute, also when the endpoint takes the connection and never answers."""
        print(f"Asking the judge at {self.url} once, to check it answers…", file=sys.stderr, flush=True)
        question = JUDGE_PROMPT.format(question="Is the sky blue?", answer="Yes.", pred="Yes, it is.")
        self._complete(question, timeout_s=PROBE_TIMEOUT_S, tries=2)

    def _complete(self, prompt: str, *, timeout_s: float | None = None, tries: int | None = None) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
        headers = {"Content-Type": "application/json"}
        key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        wait_s, attempt = self.first_wait_s, 0
        timeout_s, tries = timeout_s or self.timeout_s, tries or self.tries
        while True:
            attempt += 1
            request = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    document = json.loads(response.read())
                return str(document["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as error:
                if error.code not in RETRIED_HTTP_STATUSES:
                    raise InputError(
                        f"The judge endpoint {self.url} answered HTTP {error.code}; check the URL, the model "
                        f"name and the key in {' or '.join(API_KEY_VARIABLES)}."
                    ) from error
                if attempt >= tries:
                    raise InputError(self._gave_up(f"HTTP {error.code}", error.code == 429)) from error
                asked = _retry_after_s(error.headers.get("Retry-After") if error.headers else None)
                time.sleep(min(self.max_wait_s, asked if asked is not None else wait_s))
            except (TimeoutError, ConnectionResetError, http.client.HTTPException) as error:
                if attempt >= tries:
                    raise InputError(
                        self._gave_up(f"no answer ({str(error) or type(error).__name__})", False)
                    ) from error
                time.sleep(min(self.max_wait_s, wait_s))
            except urllib.error.URLError as error:
                if not isinstance(error.reason, TimeoutError) or attempt >= tries:
                    raise InputError(
                        f"The judge endpoint {self.url} could not be reached ({error.reason}); check the URL."
                    ) from error
                time.sleep(min(self.max_wait_s, wait_s))
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise InputError(
                    f"The judge endpoint {self.url} did not answer like an OpenAI-compatible chat API."
                ) from error
            wait_s *= 2

    def _gave_up(self, what: str, rate_limited: bool) -> str:
        if rate_limited:
            return (
                f"The judge endpoint {self.url} was rate limited (HTTP 429) on all {self.tries} tries: wait, or raise "
                "the limit of its account, then run the same command again (answers already judged are kept)."
            )
        return (
            f"The judge endpoint {self.url} gave {what} on all {self.tries} tries: the server is in trouble or "
            "overloaded; run the same command again later (answers already judged are kept)."
        )


def _retry_after_s(value) -> float | None:
    """A Retry-After header in seconds (its date form is not used by chat APIs: None, as for no header)."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


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
