"""megatron-tsp tests (a package, so that pytest and the modules that share cached runs import each test module once)."""
