"""Runtime layer: publisher, worker, dead letters, retention."""
