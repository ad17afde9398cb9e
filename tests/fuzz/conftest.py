"""Hypothesis profiles for the fuzzers: "bounded" (the default, a few seconds for the whole of
tests/fuzz in `make test`) and "fuzz" (`make fuzz`: many more examples, no time limit per
example). Choose one with HYPOTHESIS_PROFILE. Failures print the falsifying example; no example
database is written.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("bounded", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bounded"))
