"""The ``agentstreams demo`` engine: OpenAI Agents SDK agents in separate worker processes.

``scripted`` is the offline model; ``team`` builds the three agents (triage -> research ->
writer); ``worker`` hosts one of them in its own process; ``runner`` orchestrates a run (server,
processes, sessions, the kill -9); ``timeline`` keeps the numbers; ``display`` renders them.
"""
