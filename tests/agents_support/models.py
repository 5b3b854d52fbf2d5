"""Offline models for tests: the rule-driven ``ScriptedModel`` now lives in the library
(``agentstreams.demo.scripted``, used by the demo); re-exported here for the tests."""

from __future__ import annotations

from agentstreams.demo.scripted import CALL_USAGE, Rule, RuleModel, input_items

__all__ = ["CALL_USAGE", "Rule", "RuleModel", "input_items"]
