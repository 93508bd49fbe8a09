"""GPU performance: benchmarks against dense baselines and measured ceilings, the tuner."""
