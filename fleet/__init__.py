"""edgepack.fleet: the operator side — device registry from retained device state, rollout plans and
their journal, and the rollout engine."""
