"""The ``agentstreams demo`` engine: roles (what agents do), agent processes, runner, display.

``roles`` knows nothing of Redis; ``agent`` hosts one role on a coordinator in its own process;
``runner`` orchestrates a run; ``timeline`` keeps the numbers; ``display`` renders them.
"""
