"""The `llmcache` command: `llmcache <subcommand> [options]` (also `python -m llmcache ...`).

Subcommands load their module on use, so `llmcache --help` stays instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("llmcache.demo", "a tour on real models, cache off vs on vs ideal: embeddings, chat, semantic, Redis"),
}


def _usage() -> str:
    lines = ["usage: llmcache <command> [options]   (llmcache <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {help}" for name, (_, help) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv` (default sys.argv[1:]) to a subcommand's `main`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ._build_info import __version__

        print(f"llmcache {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"llmcache: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
