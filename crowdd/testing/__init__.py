"""Test and benchmark harnesses: namespaced hosts (:mod:`.netns`), node processes (:mod:`.nodes`)."""
