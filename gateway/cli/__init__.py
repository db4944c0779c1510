"""The `optgate` command line, one module per command group. Exit codes: 0 ok, 1 failure,
2 bad usage/config; `optout import|export` add 75 (EX_TEMPFAIL) for a store or audit log
that failed part-way.

Secrets are never taken from the command line: passwords on stdin, keys in the key file.

    main       the parser (each group adds its own commands) and the exit-code mapping
    common     what every command shares: config, errors, the CLI audit stream, the store
    cmd_serve      optgate serve
    cmd_optout     optout add|remove|get         cmd_bulk    optout import|export
    cmd_store      store init, optout rebuild    cmd_audit   audit verify|search|tail
    cmd_keys       keys init|rotate|api-key      cmd_sync    sync status|replay
    cmd_senders    senders hash-password         cmd_certs   certs dev
    cmd_rules      rules check
"""

from __future__ import annotations

from gateway.cli.main import main

__all__ = ["main"]
