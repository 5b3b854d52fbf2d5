"""Offline models for tests: the SDK's ``ScriptedModel``, driven by a rule over the input.

A step list is consumed call by call, which breaks when a hop is re-run in another process
(after a crash) or when one worker serves several runs. A rule answers from the conversation it
is given, so every process, every replica and every re-run makes the same decision.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

from agents.items import ModelResponse, TResponseOutputItem, TResponseStreamEvent
from agents.models.interface import Model
from agents.testing import ModelCall, ModelStep, ScriptedModel
from agents.usage import Usage

Rule = Callable[[list[dict[str, Any]]], list[TResponseOutputItem]]

#: What every scripted call costs, so token totals can be compared across deployments.
CALL_USAGE = Usage(requests=1, input_tokens=10, output_tokens=5, total_tokens=15)


def input_items(call_input: Any) -> list[dict[str, Any]]:
    """The model input as a list of item dicts (a bare string becomes one user message)."""
    if isinstance(call_input, str):
        return [{"role": "user", "content": call_input}]
    return [dict(item) for item in call_input]


class RuleModel(Model):
    """A model whose every answer is ``rule(input items)``, served by ``ScriptedModel``."""

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
        return await self._scripted().get_response(*args, **kwargs)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        return self._scripted().stream_response(*args, **kwargs)
