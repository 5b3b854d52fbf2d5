"""The ``agentstreams`` command line (extra ``cli``)."""
