"""The gate's rules, one module each (:mod:`memlens.policy.registry` lists them in the gate's order).

A rule module defines ``NAME`` (the key under ``rules:`` in a policy), ``SETTING`` (the pydantic field
of that key: ``(type, Field(...))``, or None for a rule the gate always applies), and
``check(ctx, setting) -> list[RuleResult]``, which reads the typed audit record
(:class:`memlens.audit.results.Audit`) through ``ctx`` and returns its verdict rows. Adding a rule:
a module here, a line in the registry, a test (docs/architecture.md).
"""
