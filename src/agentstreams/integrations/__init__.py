"""Integrations with agent frameworks, each behind its own extra.

* ``agentstreams.integrations.openai_agents`` — OpenAI Agents SDK (``pip install
  'agentstreams[agents]'``): lifecycle hooks and distributed agents over Redis Streams.
"""
