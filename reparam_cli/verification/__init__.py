"""Verification: the deploy model against the training model on random inputs, with a float64
reference, per-block errors, tolerances per dtype and FLOP counts (`equivalence.verify`)."""
