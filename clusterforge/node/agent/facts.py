"""`python3 -m clusterforge.node.agent.facts`: every service's facts on this node, as JSON.

What unit tests feed to plan(): recorded on a real node (tests/unit/data/facts/), with the
seed's public part (no key, no secret: facts never hold one)."""

from __future__ import annotations

import json
import sys
from typing import Any

from .. import seed as seedlib
from .context import Ctx
from .core import to_jsonable
from .loop import SERVICES


def dump(ctx: Ctx) -> dict[str, Any]:
    return {
        "cluster": ctx.seed.cluster.to_dict(),
        "identity": {"cluster": ctx.seed.identity.cluster, "node": ctx.seed.identity.node},
        "facts": {s.name: to_jsonable(s.facts(ctx)) for s in SERVICES if s.applies(ctx)},
    }


def main() -> int:
    print(json.dumps(dump(Ctx(seedlib.load())), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
