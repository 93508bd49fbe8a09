"""The generator: analysis, footprint, plan, tuning records, rendering (templates are package data), the JIT cache."""
