"""The `vaekit` command and `python -m vaekit`.

Loading the CLI loads torch, which takes a second or more; a Ctrl-C in that time would end in a
traceback from deep inside torch's import. Nothing has been read or written by then, so it gets
one line and exit code 130 instead, as an interrupt does once the CLI runs (vaekit.cli.main).
"""

import sys


def run() -> None:
    try:
        from vaekit import cli
    except KeyboardInterrupt:
        print("interrupted while starting: nothing was read or written.", file=sys.stderr)
        sys.exit(130)
    cli.run()


if __name__ == "__main__":
    run()
