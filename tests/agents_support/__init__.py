"""Helpers for the OpenAI Agents SDK integration tests: offline models, a scenario, workers."""
