"""The whole-federation demo on the local test cluster (`make demo`), also the e2e test's driver."""
