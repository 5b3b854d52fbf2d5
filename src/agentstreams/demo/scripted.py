"""Offline models for the demo (and the tests): the SDK's ``ScriptedModel``, driven by a rule.

A list of scripted steps is consumed call by call, which breaks as soon as a hop is re-run in
another process (after a crash) or one worker serves several runs at once. A *rule* answers
from the conversation it is given, so every process, every replica and every re-run makes the
same decision: exactly what a crash-recovery demo needs. No network, no API key.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

from agents.items import ModelResponse, TResponseOutputItem, TResponseStreamEvent
from agents.models.interface import Model
from agents.testing import ModelCall, ModelStep, ScriptedModel
from agents.usage import Usage

__all__ = ["CALL_USAGE", "Rule", "RuleModel", "input_items", "tool_outputs", "user_text"]

#: Decides one model turn from the conversation (the input items the model would see).
Rule = Callable[[list[dict[str, Any]]], list[TResponseOutputItem]]

#: What every scripted call costs by default, so token totals can be compared across runs.
CALL_USAGE = Usage(requests=1, input_tokens=10, output_tokens=5, total_tokens=15)


def input_items(call_input: Any) -> list[dict[str, Any]]:
    """The model input as a list of item dicts (a bare string becomes one user message)."""
    if isinstance(call_input, str):
        return [{"role": "user", "content": call_input}]
    return [dict(item) for item in call_input]


def user_text(items: list[dict[str, Any]]) -> str:
    """The first user message of the conversation ("" when there is none)."""
    for item in items:
        if item.get("role") == "user" and isinstance(item.get("content"), str):
            return str(item["content"])
    return ""


def tool_outputs(items: list[dict[str, Any]], tool: str) -> list[str]:
    """Outputs of every call of function tool ``tool`` in the conversation, in order."""
    calls = {i.get("call_id") for i in items if i.get("type") == "function_call"
             and i.get("name") == tool}
    return [str(i["output"]) for i in items if i.get("type") == "function_call_output"
            and i.get("call_id") in calls]


class RuleModel(Model):
    """A model whose every answer is ``rule(input items)``, served by the SDK's
    ``ScriptedModel`` (so responses, usage and streaming look like a real model's)."""

    def __init__(self, rule: Rule, usage: Usage = CALL_USAGE) -> None:
        self.rule = rule
        self.usage = usage
        self.calls = 0

    def _scripted(self) -> ScriptedModel:
        self.calls += 1

        def respond(call: ModelCall) -> ModelStep:
            return ModelStep(output=self.rule(input_items(call.input)),
                             usage=copy.deepcopy(self.usage))

        return ScriptedModel([ModelStep.respond(respond)])

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """One turn: the rule's answer to this call's input."""
        return await self._scripted().get_response(*args, **kwargs)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        """One streamed turn (the rule's answer as stream events)."""
        return self._scripted().stream_response(*args, **kwargs)
