"""Where the time of one `qdoctor train` goes: runs it in-process under cProfile and prints the slowest
calls by cumulative time (arguments after the script's name go to `qdoctor train`).

    python scripts/profile_train.py --skip-probes --output /tmp/run-prof

PROFILE_DUMP=FILE also writes the raw statistics (pstats format) there.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys


def main() -> None:
    from qdoctor.cli import cli

    prof = cProfile.Profile()
    prof.enable()
    try:
        cli.main(["train", *sys.argv[1:]], standalone_mode=False)
    except SystemExit:
        pass
    finally:
        prof.disable()
    if os.environ.get("PROFILE_DUMP"):
        prof.dump_stats(os.environ["PROFILE_DUMP"])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
    print(buf.getvalue(), file=sys.stderr)


if __name__ == "__main__":
    main()
