"""The ``bwrf-train --method`` registry: one module per method, each declaring its options,
checks and builder (see :class:`MethodSpec`).

Adding a method: a module here with a ``SPEC`` (its options, how they map onto its library
config, how it builds its :class:`Method`), and its name in ``METHODS`` below.
"""

from bwrf_ext.train.methods import blockkd, bwrf, contsup, fp, lsq
from bwrf_ext.train.methods.base import Method, MethodSpec, Options, Parts

# In --help order: their option groups are listed in this order.
METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (fp.SPEC, lsq.SPEC, bwrf.SPEC, blockkd.SPEC, contsup.SPEC)
}


def option_groups() -> list[Options]:
    """Every method's option groups, each once, in registry order."""
    groups: list[Options] = []
    for spec in METHODS.values():
        groups += [options for options in spec.options if options not in groups]
    return groups


__all__ = ["METHODS", "Method", "MethodSpec", "Options", "Parts", "option_groups"]
