"""Subcommands of ``medscale``, one module each, found automatically by ``medscale.cli``.

Each module defines ``register(subparsers)``, which adds its parser(s) and sets ``func`` with
``parser.set_defaults(func=run)``; ``run(args) -> int | None`` calls the library and prints.
Modules here import only the standard library at top level: heavy imports (jax, pandas) happen inside
``run`` so that ``medscale budget`` stays instant.
"""
