"""megatron-tsp: folded tensor and sequence parallelism (TSP) as a Megatron-LM plugin."""
