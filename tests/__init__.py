"""megatron-tsp tests: a package, so that pytest and the modules sharing cached runs import each test
module once."""
