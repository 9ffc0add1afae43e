"""Test harnesses that drive real agent processes: crash points, the crash loop and its invariants."""
