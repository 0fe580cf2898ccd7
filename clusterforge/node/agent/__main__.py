"""`python3 -m clusterforge.node.agent`: the clusterforge agent (clusterforge-agent.service)."""

from __future__ import annotations

import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
