"""The `xla` (pure-jnp reference) implementation against the conformance suite."""

from conformance import ConformanceSuite


class TestXla(ConformanceSuite):
    implementation = "xla"
    supports_float64 = True
