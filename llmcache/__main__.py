"""`python -m llmcache <command>`: the same as the `llmcache` command (llmcache.cli)."""

import sys

from .cli import main

sys.exit(main())
