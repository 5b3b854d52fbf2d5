"""The integration is optional: without the SDK it says how to install it, and the core
never imports the SDK."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import agentstreams.integrations.openai_agents as integration

BLOCK_SDK = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class NoSdk(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "agents" or name.startswith("agents."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoSdk())
""")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_import_without_the_sdk_says_how_to_install_it() -> None:
    proc = run_python(BLOCK_SDK + textwrap.dedent("""
        import agentstreams  # the core works without the SDK
        try:
            import agentstreams.integrations.openai_agents
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
            print("CAUSE:", type(exc.__cause__).__name__)
        else:
            print("imported?!")
    """))
    assert proc.returncode == 0, proc.stderr
    assert ("IMPORT-ERROR: agentstreams.integrations.openai_agents needs the OpenAI Agents SDK: "
            "pip install 'agentstreams[agents]'") in proc.stdout
    assert "CAUSE: ModuleNotFoundError" in proc.stdout


def test_the_core_does_not_import_the_sdk() -> None:
    proc = run_python("import sys, agentstreams, agentstreams.integrations; "
                      "print('agents' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_public_surface() -> None:
    assert sorted(integration.__all__) == [
        "AgentClient", "AgentRunError", "AgentRunResult", "AgentRunTimeoutError", "AgentWorker",
        "AgentWorkerStats", "ChainLink", "ClientStats", "CoordinatorHooks", "ErrorTracker",
        "HookStats", "HopStatus", "Keys", "RemoteHandoffRequest", "RunStatus", "TaskEnvelope",
        "TaskInfo", "compose_hooks", "current_task", "is_remote_stand_in",
        "pending_remote_handoff", "remote_handoff", "tool_call_key"]
    for name in integration.__all__:
        assert getattr(integration, name).__doc__, name
